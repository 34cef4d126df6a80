"""Argument parsing of `nudge` and the errors raised before any network or database access."""

from __future__ import annotations

from pathlib import Path

import pytest

from nudge.cli import admin, api, health, up
from nudge.cli.common import CliError
from nudge.cli.main import build_parser, main


@pytest.fixture(autouse=True)
def _no_stack_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Nudge variables and no .nudge/env may leak into these tests."""
    for name in ("DATABASE_URL", "NATS_URL", "NUDGE_API_KEY", "NUDGE_ENV"):
        monkeypatch.delenv(name, raising=False)
    for service in ("INGEST", "RULES", "SCHEDULER", "DISPATCH"):
        monkeypatch.delenv(f"NUDGE_{service}_ADDR", raising=False)
    monkeypatch.setenv("NUDGE_STATE_DIR", str(tmp_path / "state"))


def test_every_command_dispatches_to_its_function() -> None:
    parser = build_parser()
    cases = [
        (["up"], up.run_up),
        (["migrate"], admin.run_migrate),
        (["keys", "create", "--workspace", "w"], admin.run_keys_create),
        (["time", "now"], admin.run_time_now),
        (["time", "advance", "1h"], admin.run_time_advance),
        (["track", "--user", "u", "--event", "e"], api.run_track),
        (["identify", "--user", "u", "--traits", "{}"], api.run_identify),
        (["campaigns", "apply", "a.yaml", "b.yaml"], api.run_campaigns_apply),
        (["campaigns", "list"], api.run_campaigns_list),
        (["user", "u1"], api.run_user),
        (["messages", "u1"], api.run_messages),
        (["healthcheck", "127.0.0.1:1"], health.run_healthcheck),
    ]
    for argv, func in cases:
        assert parser.parse_args(argv).func is func, argv


def test_track_options() -> None:
    args = build_parser().parse_args(
        [
            "track",
            "--user",
            "u1",
            "--event",
            "order_shipped",
            "--props",
            '{"total": 30}',
            "--event-id",
            "e1",
            "--addr",
            ":7000",
            "--api-key",
            "nk_x",
        ]
    )
    assert (args.user, args.event, args.props, args.event_id) == (
        "u1",
        "order_shipped",
        '{"total": 30}',
        "e1",
    )
    assert (args.addr, args.api_key, args.timeout) == (":7000", "nk_x", 10.0)


def test_up_options() -> None:
    args = build_parser().parse_args(
        ["up", "--state-dir", "/s", "--smtp-url", "smtp://h:25", "--skip", "rules"]
    )
    assert (args.state_dir, args.smtp_url, args.skip) == ("/s", "smtp://h:25", ["rules"])
    defaults = build_parser().parse_args(["up"])
    assert (defaults.state_dir, defaults.smtp_url, defaults.skip) == (None, None, [])


def test_keys_create_default_scopes() -> None:
    args = build_parser().parse_args(["keys", "create", "--workspace", "acme"])
    assert args.scopes == "track,admin"


def test_healthcheck_service_is_optional() -> None:
    parser = build_parser()
    assert parser.parse_args(["healthcheck", "h:1"]).service == ""
    args = parser.parse_args(["healthcheck", "h:1", "nudge.ingest.v1.IngestService"])
    assert args.service == "nudge.ingest.v1.IngestService"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["track", "--user", "u"],  # --event missing
        ["identify", "--user", "u"],  # --traits missing
        ["keys", "create"],
        ["keys"],
        ["time"],
        ["time", "advance"],
        ["campaigns", "apply"],
        ["nope"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: nudge" in capsys.readouterr().err


def test_bad_props_json_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["track", "--user", "u", "--event", "e", "--props", "{bad", "--api-key", "k"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --props: invalid JSON: ")
    assert "Traceback" not in err


def test_missing_api_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["track", "--user", "u", "--event", "e"]) == 2
    assert "no API key" in capsys.readouterr().err


def test_bad_address_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["user", "u1", "--addr", "no-port", "--api-key", "k"]) == 2
    assert "must be host:port" in capsys.readouterr().err


def test_time_advance_rejects_bad_duration_before_connecting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["time", "advance", "soon"]) == 2
    assert "not a duration" in capsys.readouterr().err


def test_time_advance_refused_in_production(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NUDGE_ENV", "production")
    assert main(["time", "advance", "1h"]) == 1
    assert "NUDGE_ENV=production" in capsys.readouterr().err


def test_database_commands_need_database_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate"]) == 2
    assert "DATABASE_URL is not set" in capsys.readouterr().err


def test_keys_create_validates_workspace_and_scopes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "--workspace", "Not Valid"]) == 2
    assert "not a workspace id" in capsys.readouterr().err
    assert main(["keys", "create", "--workspace", "acme", "--scopes", "root"]) == 2
    assert "unknown scope" in capsys.readouterr().err


def test_healthcheck_reports_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    from nudge.dev.stack import free_port

    address = f"127.0.0.1:{free_port()}"
    assert main(["healthcheck", address, "--timeout", "1"]) == 1
    assert capsys.readouterr().out.startswith(f"{address}: UNAVAILABLE")


def test_campaign_files_are_checked_before_sending(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("id: c1\nstarts: 2025-01-02\n---\nid: c2\n")
    assert api.load_campaign_documents(good) == [{"id": "c1", "starts": "2025-01-02"}, {"id": "c2"}]
    broken = tmp_path / "broken.yaml"
    broken.write_text("id: [unclosed\n")
    with pytest.raises(CliError, match="invalid YAML"):
        api.load_campaign_documents(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(CliError, match="must be a mapping"):
        api.load_campaign_documents(scalar)
    with pytest.raises(CliError, match="cannot read"):
        api.load_campaign_documents(tmp_path / "missing.yaml")
