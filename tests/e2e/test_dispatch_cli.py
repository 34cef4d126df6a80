"""The delivery commands against the running stack: `nudge workspace apply|show`,
`nudge preview`, `nudge dead-letters list|replay`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nudge.cli.main import main
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "campaigns"

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def nudge(
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> Run:
    monkeypatch.setenv("NUDGE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NUDGE_API_KEY", stack.api_key)
    for service in ("ingest", "rules", "dispatch"):
        monkeypatch.setenv(f"NUDGE_{service.upper()}_ADDR", stack.address(service))

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_workspace_policy_preview_and_dead_letters_from_the_cli(nudge: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("frequency_caps:\n  - {channel: any, max: 3, per: 1 day}\n")
    code, _, err = nudge("workspace", "apply", str(bad))
    assert code == 1
    assert "frequency_caps[0].per" in err

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "default_timezone: Europe/Berlin\n"
        "frequency_caps:\n"
        "  - {channel: any, max: 3, per: 1d}\n"
        "  - {channel: push, max: 1, per: 1h}\n"
        'quiet_hours: {start: "22:00", end: "08:00", channels: [push, sms]}\n'
    )
    assert nudge("workspace", "apply", str(policy))[:2] == (
        0,
        "workspace policy version 1 (changed)\n",
    )
    unchanged = nudge("workspace", "apply", str(policy))[1]
    assert unchanged == "workspace policy version 1 (unchanged)\n"
    shown = json.loads(nudge("workspace", "show", "--json")[1])
    assert shown["quiet_hours"] == {
        "start": "22:00",
        "end": "08:00",
        "channels": ["push", "sms"],
    }
    assert shown["default_timezone"] == "Europe/Berlin"

    assert nudge("campaigns", "apply", str(EXAMPLES / "order-shipped.yaml"))[0] == 0
    traits = {"email": "ada@example.test", "first_name": "Ada"}
    traits["email_subscribe"] = "unsubscribed"
    assert nudge("identify", "--user", "ada", "--traits", json.dumps(traits))[0] == 0
    _eventually(lambda: nudge("user", "ada", "--json")[0] == 0)
    props = json.dumps({"order_id": "A-17", "total": 42, "eta": "Monday"})
    code, out, _ = nudge("preview", "order-shipped", "--user", "ada", "--props", props)
    assert code == 0
    assert "subject: Your order A-17 is on its way\n" in out
    assert "body: Hi Ada, it arrives Monday.\n" in out
    assert "policy now: suppress (user unsubscribed from email (email_subscribe))" in out
    code, _, err = nudge("preview", "order-shipped", "--user", "ada")
    assert code == 1  # no eta: a missing variable aborts the message (fields in name order)
    assert "render error in body: event.properties.eta is undefined" in err

    assert nudge("identify", "--user", "bob", "--traits", '{"email": "not an address"}')[0] == 0
    order = json.dumps({"order_id": "B-1", "total": 30, "eta": "soon"})
    assert nudge("track", "--user", "bob", "--event", "order_shipped", "--props", order)[0] == 0

    def dead_letters() -> list[dict[str, object]]:
        letters: list[dict[str, object]] = json.loads(nudge("dead-letters", "list", "--json")[1])
        return letters

    _eventually(lambda: len(dead_letters()) == 1)
    [letter] = dead_letters()
    assert letter["user_id"] == "bob"
    assert "invalid recipient address" in str(letter["reason"])
    code, out, _ = nudge("dead-letters", "replay", str(letter["dead_letter_id"]))
    assert (code, out) == (
        0,
        f"replayed {letter['dead_letter_id']}: send {letter['send_id']} is planned again\n",
    )
    code, out, _ = nudge("dead-letters", "replay", str(letter["dead_letter_id"]))
    assert code == 0
    assert "was already replayed" in out
    code, _, err = nudge("dead-letters", "replay", "999999")
    assert code == 2
    assert "NOT_FOUND" in err

    # A global control group (issue 6) is part of the policy (applied last: it would hold a
    # random 5% of users out of the marketing sends above).
    policy.write_text(policy.read_text() + "global_control: {percent: 5, salt: q4}\n")
    assert nudge("workspace", "apply", str(policy))[1] == "workspace policy version 2 (changed)\n"
    shown = json.loads(nudge("workspace", "show", "--json")[1])
    assert shown["global_control"] == {"percent": 5, "salt": "q4"}
    assert shown["default_timezone"] == "Europe/Berlin"


def test_preview_picks_the_branch_a_send_would_and_shows_a_variant(nudge: Run) -> None:
    onboarding = str(EXAMPLES / "onboarding.yaml")
    experiment = str(EXAMPLES.parent / "experiments" / "abandoned-cart-ab.yaml")
    assert nudge("campaigns", "apply", onboarding, experiment)[0] == 0
    for user in ("ada", "pat"):
        traits = json.dumps({"email": f"{user}@example.test", "first_name": user.title()})
        assert nudge("identify", "--user", user, "--traits", traits)[0] == 0
    assert nudge("track", "--user", "pat", "--event", "feature_x_used")[0] == 0
    _eventually(lambda: nudge("user", "ada", "--json")[0] == 0)
    _eventually(lambda: '"feature_x_used"' in nudge("user", "pat", "--json")[1])

    code, out, _ = nudge("preview", "onboarding-day-1", "--user", "ada")
    assert code == 0
    assert "# branch 0 of 2 (chosen by the `when` conditions)" in out
    assert "subject: Have you tried Feature X?" in out
    code, out, _ = nudge("preview", "onboarding-day-1", "--user", "pat")
    assert "# branch 1 of 2 (chosen by the `when` conditions)" in out
    assert "you have used Feature X 1 times already" in out
    code, out, _ = nudge("preview", "onboarding-day-1", "--user", "pat", "--branch", "0")
    assert "# branch 0 of 2 (chosen with --branch)" in out

    props = json.dumps({"cart_id": "C-9"})
    code, out, _ = nudge("preview", "abandoned-cart-ab", "--user", "ada", "--props", props)
    assert code == 0
    assert "subject: You left something in your cart" in out
    assert "https://unsubscribe.invalid/preview" in out  # {{ unsubscribe_url }}: a placeholder
    args = ("preview", "abandoned-cart-ab", "--user", "ada", "--props", props)
    code, out, _ = nudge(*args, "--variant", "wait-24h")
    assert code == 0
    assert "# variant wait-24h" in out
    assert "subject: Still thinking about it?" in out
    code, _, err = nudge(*args, "--variant", "wait-1w")
    assert code == 2
    assert "--variant: the campaign's variants are ['wait-1h', 'wait-24h']" in err
