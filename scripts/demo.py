"""`make demo`: the whole of Nudge on this machine, from a gRPC call to a delivered message.

Run from the repository root: ``python -m scripts.demo``. It

1. starts a local SMTP sink and HTTP sink (real protocol peers that record what they receive);
2. runs ``nudge up`` in a fresh temporary state directory on free ports (so it never collides
   with a stack you already run), its output going to a log file in that directory;
3. applies every campaign in ``examples/campaigns/`` with ``nudge campaigns apply``;
4. identifies three users and tracks events, with the ``nudge`` CLI (what you would type) and
   with a direct gRPC call (what an SDK does), both through the public IngestService;
5. waits for the deliveries, checks them, prints them, and shows ``nudge messages``;
6. runs the campaign engine on a small simulated population with time skipping
   (``nudge time advance``): whale and price-drop nudges at once, an abandoned-cart reminder
   after an hour (cancelled for the user who bought that cart), onboarding a day after the first
   session (a different message for users of Feature X), win-back after 14 days without a
   session (not for users back on day 13); prints what was sent, what was cancelled and why
   (``nudge why``), and checks that replay equals live (``nudge replay``);
7. runs an experiment (``examples/experiments/abandoned-cart-ab.yaml``: control 20%, a reminder
   after 1 h or after 24 h) on 600 simulated shoppers who buy more often after the 1 h reminder,
   backtests the same definition over the recorded period (``nudge backtest``), and ends with the
   results table (``nudge stats``);
8. stops ``nudge up`` with SIGTERM and checks that it exits 0.

Exit 0 when everything expected was delivered (and nothing else), else 1 with the reason and
the path of the log. The temporary directory is removed on success and kept on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from standardwebhooks import Webhook

from nudge.dev.stack import _die_with_parent, free_ports
from nudge.dispatch.v1 import dispatch_pb2, dispatch_pb2_grpc
from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct
from nudge.testing.sinks import HttpSink, ReceivedMail, ReceivedRequest, SmtpSink
from services.dispatch.channels.webhook import workspace_secret

REPO = Path(__file__).resolve().parents[1]
CAMPAIGNS = REPO / "examples" / "campaigns"
EXPERIMENT = REPO / "examples" / "experiments" / "abandoned-cart-ab.yaml"
SHOPPERS = 600
SERVICES = ("ingest", "rules", "scheduler", "dispatch")

READY_TIMEOUT_S = 45.0
DELIVERY_TIMEOUT_S = 30.0
SETTLE_S = 1.0
"""After the expected deliveries: how long to watch for unexpected extra ones."""
STOP_TIMEOUT_S = 20.0
CLI_TIMEOUT_S = 30.0
FINAL_STATES = frozenset({"sent", "failed", "suppressed", "dead"})


class DemoFailed(Exception):
    """The demo cannot go on: print the message and exit 1."""


# --------------------------------------------------------------------------------------------
# the scenario


@dataclass(frozen=True)
class User:
    """A user the demo identifies."""

    user_id: str
    traits: dict[str, str]


@dataclass(frozen=True)
class Event:
    """An event the demo tracks (fixed ids, so every run is the same)."""

    event_id: str
    user_id: str
    name: str
    properties: dict[str, Any]
    note: str


@dataclass(frozen=True, order=True)
class ExpectedMail:
    """An email the campaigns must deliver."""

    to: str
    subject: str
    body: str


@dataclass(frozen=True)
class ExpectedWebhook:
    """A webhook the campaigns must deliver."""

    path: str
    payload: dict[str, Any]


def users(webhook_base: str) -> list[User]:
    """Three users; linus has no first name (the template's default applies)."""
    return [
        User(
            "ada",
            {"email": "ada@example.com", "first_name": "Ada", "crm_webhook": f"{webhook_base}/ada"},
        ),
        User(
            "grace",
            {
                "email": "grace@example.com",
                "first_name": "Grace",
                "crm_webhook": f"{webhook_base}/grace",
            },
        ),
        User("linus", {"email": "linus@example.com", "crm_webhook": f"{webhook_base}/linus"}),
    ]


CLI_EVENT = Event(
    "order-A-1001",
    "ada",
    "order_shipped",
    {"order_id": "A-1001", "total": 42.5, "eta": "Monday"},
    "email at once",
)
GRPC_EVENTS = [
    Event(
        "order-B-2002",
        "grace",
        "order_shipped",
        {"order_id": "B-2002", "total": 99, "eta": "Tuesday"},
        "email at once",
    ),
    Event(
        "order-C-3003",
        "linus",
        "order_shipped",
        {"order_id": "C-3003", "total": 12.5, "eta": "Thursday"},
        "no email: total <= 20",
    ),
    Event(
        "order-C-3004",
        "linus",
        "order_shipped",
        {"order_id": "C-3004", "total": 25, "eta": "Friday"},
        "email at once",
    ),
    Event(
        "cart-grace-77",
        "grace",
        "add_to_cart",
        {"cart_id": "cart-77", "value": 30},
        "webhook after 2 s",
    ),
    Event(
        "cart-linus-12",
        "linus",
        "add_to_cart",
        {"cart_id": "cart-12", "value": 15},
        "webhook after 2 s",
    ),
    Event(
        "cart-ada-5",
        "ada",
        "add_to_cart",
        {"cart_id": "cart-5", "value": 5},
        "no webhook: value < 10",
    ),
    # ada's order again, same event_id: a duplicate, stored and sent once
    dataclasses.replace(CLI_EVENT, note="duplicate: no second email"),
]

EXPECTED_MAIL = [
    ExpectedMail(
        "ada@example.com", "Your order A-1001 is on its way", "Hi Ada, it arrives Monday."
    ),
    ExpectedMail(
        "grace@example.com", "Your order B-2002 is on its way", "Hi Grace, it arrives Tuesday."
    ),
    ExpectedMail(
        "linus@example.com", "Your order C-3004 is on its way", "Hi there, it arrives Friday."
    ),
]
EXPECTED_WEBHOOKS = [
    ExpectedWebhook("/crm/grace", {"user": "grace", "cart": "cart-77", "value": "30"}),
    ExpectedWebhook("/crm/linus", {"user": "linus", "cart": "cart-12", "value": "15"}),
]


# --------------------------------------------------------------------------------------------
# the campaign engine on a small population (steps 7-11)

POPULATION = [
    User("mia", {"email": "mia@example.com", "first_name": "Mia"}),
    User("noah", {"email": "noah@example.com", "first_name": "Noah"}),
    User("olga", {"email": "olga@example.com", "first_name": "Olga"}),
]
ACTIVE = ["ada", "grace", "linus", "mia", "noah", "olga"]


def day_zero_events() -> list[Event]:
    """Everyone's first session, and what a few of them do next."""
    events = [
        Event(f"session-{u}-0", u, "session_start", {}, "onboarding + win-back armed")
        for u in ACTIVE
    ]
    events += [
        Event("feature-grace", "grace", "feature_x_used", {}, "onboarding: the Feature X branch"),
        Event("feature-mia", "mia", "feature_x_used", {}, "onboarding: the Feature X branch"),
    ]
    events += [Event(f"session-noah-{i}", "noah", "session_start", {}, "") for i in range(1, 4)]
    events += [
        Event("session-noah-4", "noah", "session_start", {}, "5th session in 7 days: whale"),
        Event("session-noah-5", "noah", "session_start", {}, "still a whale: nothing more"),
        Event("loyalty-olga", "olga", "loyalty_page_viewed", {}, "whale"),
        Event("buy-grace-77", "grace", "purchase", {"cart_id": "cart-77"}, "cancels cart-77"),
        Event("buy-linus-99", "linus", "purchase", {"cart_id": "cart-99"}, "another cart"),
        Event(
            "drop-ada-1", "ada", "price_dropped", {"item": "Kettle", "discount": 20}, "email now"
        ),
        Event(
            "drop-ada-2",
            "ada",
            "price_dropped",
            {"item": "Toaster", "discount": 25},
            "not re-eligible for 7 days",
        ),
    ]
    return events


def onboarding(to: str, name: str, feature_x: bool) -> ExpectedMail:
    if feature_x:
        return ExpectedMail(
            to,
            "Three more things Feature X can do",
            f"Hi {name}, you have used Feature X 1 times already.",
        )
    return ExpectedMail(
        to, "Have you tried Feature X?", f"Hi {name}, Feature X saves you an hour a week."
    )


def win_back(to: str, name: str) -> ExpectedMail:
    return ExpectedMail(
        to, f"We miss you, {name}", "It has been two weeks. Your saved items are waiting."
    )


THANKS = "Hi {}, here is early access to our loyalty programme."
PHASES: list[tuple[str, str | None, list[Event], list[ExpectedMail]]] = [
    (
        "Day 0: sessions, feature use, purchases, price drops (whale and price-drop send now)",
        None,
        day_zero_events(),
        [
            ExpectedMail("noah@example.com", "A thank-you from us", THANKS.format("Noah")),
            ExpectedMail("olga@example.com", "A thank-you from us", THANKS.format("Olga")),
            ExpectedMail(
                "ada@example.com",
                "Kettle is 20% off",
                "Hi Ada, an item you watch just got cheaper.",
            ),
        ],
    ),
    (
        "One hour later: cart reminders (grace bought cart-77; linus bought another cart)",
        "1h1m",
        [],
        [
            ExpectedMail(
                "linus@example.com",
                "You left something in your cart",
                "Cart cart-12 (15 EUR) is still waiting for you.",
            )
        ],
    ),
    (
        "Day 1: onboarding, one day after each user's first session",
        "23h",
        [],
        [
            onboarding("ada@example.com", "Ada", False),
            onboarding("grace@example.com", "Grace", True),
            onboarding("linus@example.com", "there", False),
            onboarding("mia@example.com", "Mia", True),
            onboarding("noah@example.com", "Noah", False),
            onboarding("olga@example.com", "Olga", False),
        ],
    ),
    (
        "Day 13: ada and mia come back (their win-back checks are re-armed)",
        "12d",
        [
            Event("session-ada-13", "ada", "session_start", {}, "win-back re-armed to day 27"),
            Event("session-mia-13", "mia", "session_start", {}, "win-back re-armed to day 27"),
        ],
        [],
    ),
    (
        "Day 14: win-back for everyone without a session for 14 days",
        "1d1m",
        [],
        [
            win_back("grace@example.com", "Grace"),
            win_back("linus@example.com", "friend"),
            win_back("noah@example.com", "Noah"),
            win_back("olga@example.com", "Olga"),
        ],
    ),
]
WHY = [
    ("grace", "abandoned-cart"),
    ("linus", "abandoned-cart"),
    ("noah", "whale"),
    ("ada", "price-drop"),
    ("mia", "win-back"),
]


# --------------------------------------------------------------------------------------------
# output


def say(text: str = "") -> None:
    """One line of demo output."""
    print(text, flush=True)


def step(number: int, title: str) -> None:
    """A numbered heading."""
    say()
    say(f"{number}. {title}")


def indent(text: str, prefix: str = "   ") -> str:
    """Every line of `text` prefixed."""
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").splitlines())


def compact(data: Mapping[str, Any]) -> str:
    """One-line JSON with a space after separators (readable in a terminal)."""
    return json.dumps(data, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# processes


def base_env() -> dict[str, str]:
    """This environment without Nudge settings (a developer's own stack must not leak in),
    with the repository on PYTHONPATH (harmless when the package is installed)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("NUDGE_") and name not in {"DATABASE_URL", "NATS_URL"}
    }
    paths = [str(REPO / "libs"), str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class NudgeUp:
    """`nudge up` as a child process whose merged output goes to a log file."""

    def __init__(self, state_dir: Path, log_path: Path, smtp_url: str, env: Mapping[str, str]):
        self.state_dir = state_dir
        self.log_path = log_path
        self.command = ["nudge", "up", "--state-dir", str(state_dir), "--smtp-url", smtp_url]
        self._env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (in its own session; it dies with us if we are killed)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [sys.executable, "-m", "nudge.cli", *self.command[1:]],
                cwd=REPO,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGTERM),
            )

    def lines(self) -> list[str]:
        """The log so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_ready(self, timeout: float) -> tuple[str, str]:
        """The ``nudge ready`` line and the API key, once both are printed."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            ready = next((ln for ln in lines if ln.startswith("nudge ready")), None)
            key = next((ln for ln in lines if ln.startswith("api key: ")), None)
            if ready is not None and key is not None:
                return ready, key.removeprefix("api key: ").strip()
            if self.proc.poll() is not None:
                raise DemoFailed(f"`nudge up` exited with rc={self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise DemoFailed(f"`nudge up` did not print `ready` within {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self, timeout: float) -> int:
        """SIGTERM, wait; SIGKILL the group if it hangs. Return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise DemoFailed(
                    f"`nudge up` did not exit within {timeout:.0f} s of SIGTERM"
                ) from None
        return self.proc.returncode

    def close(self) -> None:
        """After a failure: stop it gracefully if it still runs, SIGKILL if that hangs."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(DemoFailed):
                self.stop(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL the process group (services, nats-server and Postgres die with it)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Cli:
    """Runs `nudge` commands against the demo stack and prints them like a terminal session."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)

    def run(self, *args: str, show: bool = True) -> str:
        """Run ``nudge ARGS``; print the command line and its output; DemoFailed unless rc 0."""
        shown = " ".join(shlex.quote(a) for a in args)
        if show:
            say(f"   $ nudge {shown}")
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [sys.executable, "-m", "nudge.cli", *args],
            cwd=REPO,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        if show and result.stdout.strip():
            say(indent(result.stdout, "     "))
        if result.returncode != 0:
            raise DemoFailed(
                f"`nudge {shown}` exited with rc={result.returncode}:\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout


# --------------------------------------------------------------------------------------------
# gRPC (what an SDK does)


def grpc_identify(address: str, api_key: str, user: User) -> str:
    """IngestService.Identify; the outcome (``accepted``)."""
    with grpc.insecure_channel(address) as channel:
        response = ingest_pb2_grpc.IngestServiceStub(channel).Identify(
            ingest_pb2.IdentifyRequest(
                user_id=user.user_id,
                traits=dict_to_struct(user.traits),
                event_id=f"identify-{user.user_id}",
            ),
            metadata=(("authorization", f"Bearer {api_key}"),),
            timeout=10,
        )
    return status_name(response.result.status)


def grpc_track(address: str, api_key: str, events: Sequence[Event]) -> list[str]:
    """IngestService.Track with all `events` in one request; one outcome per event."""
    request = ingest_pb2.TrackRequest(
        events=[
            ingest_pb2.Event(
                event_id=e.event_id,
                user_id=e.user_id,
                name=e.name,
                properties=dict_to_struct(e.properties),
            )
            for e in events
        ]
    )
    with grpc.insecure_channel(address) as channel:
        response = ingest_pb2_grpc.IngestServiceStub(channel).Track(
            request, metadata=(("authorization", f"Bearer {api_key}"),), timeout=10
        )
    outcomes = []
    for result in response.results:
        outcome = status_name(result.status)
        if result.reason:
            outcome += f" ({result.reason})"
        outcomes.append(outcome)
    return outcomes


def status_name(status: int) -> str:
    """``EVENT_STATUS_ACCEPTED`` → ``accepted``."""
    return ingest_pb2.EventStatus.Name(status).removeprefix("EVENT_STATUS_").lower()  # type: ignore[arg-type]


def wait_messages_final(
    address: str, api_key: str, user_ids: Sequence[str], deadline: float
) -> None:
    """Wait until dispatch has recorded a final state for every message of these users."""
    with grpc.insecure_channel(address) as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        while True:
            pending = []
            for user_id in user_ids:
                response = stub.ListMessages(
                    dispatch_pb2.ListMessagesRequest(user_id=user_id),
                    metadata=(("authorization", f"Bearer {api_key}"),),
                    timeout=10,
                )
                pending += [m.send_id for m in response.messages if m.state not in FINAL_STATES]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise DemoFailed(f"dispatch has not recorded the outcome of sends {pending}")
            time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# checking and showing deliveries


def wait_deliveries(smtp: SmtpSink, http: HttpSink, deadline: float) -> None:
    """Wait for the expected number of emails and webhooks, then a little longer for extras."""
    mails = smtp.wait_for(len(EXPECTED_MAIL), max(0.0, deadline - time.monotonic()))
    hooks = http.wait_for(len(EXPECTED_WEBHOOKS), max(0.0, deadline - time.monotonic()))
    if len(mails) < len(EXPECTED_MAIL) or len(hooks) < len(EXPECTED_WEBHOOKS):
        raise DemoFailed(
            f"after {DELIVERY_TIMEOUT_S:.0f} s: {len(mails)} of {len(EXPECTED_MAIL)} emails and "
            f"{len(hooks)} of {len(EXPECTED_WEBHOOKS)} webhooks arrived\n"
            + describe_arrivals(smtp.messages, http.requests)
        )
    time.sleep(SETTLE_S)


def describe_arrivals(mails: Sequence[ReceivedMail], hooks: Sequence[ReceivedRequest]) -> str:
    """What the sinks received, for a failure message."""
    lines = [f"  email to {', '.join(m.rcpt_tos)}: {m.subject!r}" for m in mails]
    lines += [f"  webhook {r.method} {r.path}: {r.body.decode(errors='replace')}" for r in hooks]
    return "received:\n" + ("\n".join(lines) if lines else "  nothing")


def check_deliveries(
    mails: Sequence[ReceivedMail], hooks: Sequence[ReceivedRequest], webhook_secret: str
) -> None:
    """Exactly the expected emails and webhooks, webhooks correctly signed."""
    got_mail = sorted(ExpectedMail(", ".join(m.rcpt_tos), m.subject, m.text) for m in mails)
    want_mail = sorted(EXPECTED_MAIL)
    problems = []
    if got_mail != want_mail:
        problems.append(f"emails differ: expected {want_mail}, got {got_mail}")
    got_hooks = []
    for request in hooks:
        try:
            payload = request.json()
        except ValueError:
            payload = request.body.decode(errors="replace")
        got_hooks.append((request.path, payload))
    want_hooks = [(w.path, w.payload) for w in EXPECTED_WEBHOOKS]
    if sorted(got_hooks, key=repr) != sorted(want_hooks, key=repr):
        problems.append(f"webhooks differ: expected {want_hooks}, got {got_hooks}")
    for request in hooks:
        if not signature_ok(request, webhook_secret):
            problems.append(f"webhook {request.path}: bad or missing Standard Webhooks signature")
    if problems:
        raise DemoFailed("\n".join(problems) + "\n" + describe_arrivals(mails, hooks))


def signature_ok(request: ReceivedRequest, secret: str) -> bool:
    """True when the request carries a valid Standard Webhooks signature for `secret`."""
    try:
        Webhook(secret).verify(request.body, request.headers)
    except Exception:
        return False
    return True


def show_deliveries(
    mails: Sequence[ReceivedMail], hooks: Sequence[ReceivedRequest], webhook_secret: str
) -> None:
    """Print each email and webhook, in a stable order."""
    say(f"   Emails received by the SMTP sink ({len(mails)}):")
    for mail in sorted(mails, key=lambda m: (m.rcpt_tos, m.subject)):
        say()
        say(f"     to:      {', '.join(mail.rcpt_tos)}")
        say(f"     from:    {mail.message['From']}")
        say(f"     subject: {mail.subject}")
        say(f"     body:    {mail.text}")
    say()
    say(f"   Webhooks received by the HTTP sink ({len(hooks)}):")
    for request in sorted(hooks, key=lambda r: r.path):
        valid = "valid" if signature_ok(request, webhook_secret) else "INVALID"
        say()
        say(f"     {request.method} {request.path}")
        say(f"     webhook-id:        {request.headers.get('webhook-id', '(missing)')}")
        say(f"     webhook-signature: {valid} (Standard Webhooks, HMAC-SHA256)")
        say(f"     body:              {compact(request.json())}")


# --------------------------------------------------------------------------------------------
# the campaign engine with time skipping


def wait_new_mails(smtp: SmtpSink, seen: int, expected: Sequence[ExpectedMail]) -> None:
    """Wait for exactly `expected` beyond the first `seen` emails, check and print them."""
    if expected:
        smtp.wait_for(seen + len(expected), DELIVERY_TIMEOUT_S)
    time.sleep(SETTLE_S)
    got = sorted(
        ExpectedMail(", ".join(m.rcpt_tos), m.subject, m.text) for m in smtp.messages[seen:]
    )
    if got != sorted(expected):
        raise DemoFailed(f"expected emails {sorted(expected)}, got {got}")
    for mail in got:
        say(f"     sent to {mail.to:<18} {mail.subject!r}: {mail.body}")
    if not got:
        say("     (no email: nothing is due)")


def campaign_engine(cli: Cli, ingest: str, api_key: str, smtp: SmtpSink, first: int) -> int:
    """Steps `first`.. : the population, the phases with time skipping, why, replay.
    Returns the next step number."""
    number = first
    step(number, "Campaign engine: a small population, with time skipping (dev clock)")
    say("   Campaigns: onboarding-day-1 (after_first), whale (threshold), win-back (inactivity),")
    say("   abandoned-cart (action + delay + exception), price-drop (re-eligibility)")
    say("   gRPC IngestService.Identify:")
    for user in POPULATION:
        say(f"     {grpc_identify(ingest, api_key, user)} {user.user_id} {compact(user.traits)}")
    for title, skip, events, expected in PHASES:
        number += 1
        step(number, title)
        seen = len(smtp.messages)
        if skip is not None:
            cli.run("time", "advance", skip)
        if events:
            outcomes = grpc_track(ingest, api_key, events)
            if outcomes != ["accepted"] * len(events):
                raise DemoFailed(f"unexpected Track outcomes: {outcomes}")
            width = max(len(e.event_id) for e in events)
            for e in events:
                parts = [f"{e.event_id:<{width}} {e.user_id:<6} {e.name}"]
                parts += [compact(e.properties)] if e.properties else []
                parts += [f" -> {e.note}"] if e.note else []
                say("     tracked " + " ".join(parts))
        wait_new_mails(smtp, seen, expected)
    number += 1
    step(number, "Why? Every decision, with its reason (nudge why)")
    for user_id, campaign_id in WHY:
        cli.run("why", user_id, campaign_id)
    number += 1
    step(number, "Replay the event store and compare with the live projection (nudge replay)")
    output = cli.run("replay")
    if not output.startswith("match: "):
        raise DemoFailed(f"replay does not match live: {output}")
    return number + 1


# --------------------------------------------------------------------------------------------
# the experiment


def shopper(n: int) -> str:
    return f"shopper-{n:03}"


def track_many(address: str, api_key: str, events: Sequence[Event]) -> None:
    """Track `events` in requests of 250 (an SDK's batching); every one must be accepted."""
    for start in range(0, len(events), 250):
        outcomes = grpc_track(address, api_key, events[start : start + 250])
        if set(outcomes) != {"accepted"}:
            raise DemoFailed(f"unexpected Track outcomes: {sorted(set(outcomes))}")


def purchases(users: Sequence[str], tag: str) -> list[Event]:
    return [Event(f"buy-{tag}-{u}", u, "purchase", {"cart_id": f"cart-{u}"}, "") for u in users]


def wait_mails(smtp: SmtpSink, count: int) -> list[ReceivedMail]:
    mails = smtp.wait_for(count, DELIVERY_TIMEOUT_S)
    if len(mails) < count:
        raise DemoFailed(f"expected {count} emails, got {len(mails)}")
    return mails


def open_and_click(mail: ReceivedMail) -> None:
    """What a reader's mail client does: load the images (the open pixel) and follow the link
    (dispatch's click redirect, answered with a 302 to the shop)."""
    found = mail.links()
    tracked = [link for link in (*found.images, *found.hrefs) if "/o/" in link or "/c/" in link]
    if len(tracked) != 2:
        raise DemoFailed(f"expected a tracked link and an open pixel, found {found}")
    for link in tracked:
        url = urllib.parse.urlsplit(link)
        connection = http.client.HTTPConnection(url.netloc, timeout=10)
        try:
            connection.request("GET", url.path)
            status = connection.getresponse().status
        finally:
            connection.close()
        if status not in (200, 302):
            raise DemoFailed(f"GET {link} answered {status}")


def wait_stats(cli: Cli, done: Any) -> dict[str, Any]:
    """Poll ``nudge stats --json`` until `done(groups by name)`."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while True:
        data = json.loads(cli.run("stats", "abandoned-cart-ab", "--json", show=False))
        groups = {group["group"]: group for group in data["groups"]}
        if done(groups):
            return groups
        if time.monotonic() > deadline:
            raise DemoFailed(f"the experiment's stats did not settle: {groups}")
        time.sleep(0.3)


def experiment(cli: Cli, ingest: str, api_key: str, smtp: SmtpSink, number: int) -> int:
    """The A/B test of reminder delays on simulated shoppers, its backtest and its results.
    Returns the next step number."""
    step(number, f"Experiment: a reminder after 1 h or after 24 h? ({SHOPPERS} simulated shoppers)")
    say("   Shoppers who get the 1 h reminder buy 2 times in 5; the others 1 in 10 (and every")
    say("   20th buys before any reminder). Control (20%) gets nothing and is still measured.")
    cli.run("campaigns", "apply", str(EXPERIMENT.relative_to(REPO)))
    start = cli.run("time", "now", show=False).split()[0]
    shoppers = [shopper(n) for n in range(SHOPPERS)]
    with grpc.insecure_channel(ingest) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        for u in shoppers:
            stub.Identify(
                ingest_pb2.IdentifyRequest(
                    user_id=u,
                    traits=dict_to_struct({"email": f"{u}@example.test"}),
                    event_id=f"identify-{u}",
                ),
                metadata=(("authorization", f"Bearer {api_key}"),),
                timeout=10,
            )
    abandoned = [
        Event(f"abandon-{u}", u, "checkout_abandoned", {"cart_id": f"cart-{u}"}, "")
        for u in shoppers
    ]
    track_many(ingest, api_key, abandoned)
    say(f"   tracked {SHOPPERS} checkout_abandoned events (gRPC IngestService.Track)")
    seen = len(smtp.messages)
    cli.run("time", "advance", "30m")
    early = shoppers[::20]
    track_many(ingest, api_key, purchases(early, "early"))
    say(f"   {len(early)} shoppers bought before any reminder (their reminders are cancelled)")

    cli.run("time", "advance", "31m")
    first = wait_stats(
        cli, lambda g: g["wait-1h"]["sent"] + g["wait-1h"]["cancelled"] == g["wait-1h"]["entered"]
    )["wait-1h"]["sent"]
    mails = wait_mails(smtp, seen + first)[seen:]
    first_arm = sorted(m.rcpt_tos[0].split("@")[0] for m in mails)
    first_buyers = [u for i, u in enumerate(first_arm) if i % 5 < 2]
    by_user = {m.rcpt_tos[0].split("@")[0]: m for m in mails}
    for u in first_buyers:
        open_and_click(by_user[u])
    say(
        f'   {first} emails "You left something in your cart"; {len(first_buyers)} open it, '
        "click the link (tracked by dispatch) and buy"
    )
    cli.run("time", "advance", "1h")
    track_many(ingest, api_key, purchases(first_buyers, "1h"))

    cli.run("time", "advance", "23h")
    groups = wait_stats(
        cli,
        lambda g: g["wait-24h"]["sent"] + g["wait-24h"]["cancelled"] == g["wait-24h"]["entered"],
    )
    second = groups["wait-24h"]["sent"]
    mails = wait_mails(smtp, seen + first + second)[seen + first :]
    second_arm = sorted(m.rcpt_tos[0].split("@")[0] for m in mails)
    control = sorted(u for u in shoppers if u not in set(first_arm) | set(second_arm) | set(early))
    buyers = second_arm[::10] + control[::10]
    say(
        f'   {second} emails "Still thinking about it?"; {len(second_arm[::10])} buy, and '
        f"{len(control[::10])} of {len(control)} control shoppers"
    )
    cli.run("time", "advance", "1h")
    track_many(ingest, api_key, purchases(buyers, "late"))
    cli.run("time", "advance", "4d")
    end = cli.run("time", "now", show=False).split()[0]
    converted = len(early) + len(first_buyers) + len(buyers)
    wait_stats(
        cli,
        lambda g: (
            sum(group["converted"] for group in g.values()) == converted
            and g["wait-1h"]["clicked"] == len(first_buyers)
        ),
    )

    number += 1
    step(
        number,
        "Backtest: the same definition over the recorded period sends nothing, and "
        "agrees with live",
    )
    output = cli.run(
        "backtest",
        str(EXPERIMENT.relative_to(REPO)),
        "--from",
        start,
        "--to",
        end,
        "--json",
        show=False,
    )
    report = json.loads(output)
    say(f"   $ nudge backtest {EXPERIMENT.relative_to(REPO)} --from {start} --to {end}")
    say(
        f"     {report['entries']} would have entered; {report['sends_count']} would-be sends "
        f"({compact(report['outcomes'])}); {report['cancelled_by_exception']} cancelled by an "
        "exception"
    )
    live_sent = first + second
    if report["outcomes"].get("sent") != live_sent:
        raise DemoFailed(f"backtest says {report['outcomes']}, live sent {live_sent}")

    number += 1
    step(number, "The experiment's results (nudge stats)")
    table = cli.run("stats", "abandoned-cart-ab")
    if "wait-1h converts better than control" not in table:
        raise DemoFailed("the planted difference was not found")
    return number + 1


# --------------------------------------------------------------------------------------------
# the demo


@contextlib.contextmanager
def sinks() -> Iterator[tuple[SmtpSink, HttpSink]]:
    """A started SMTP sink and HTTP sink, stopped afterwards."""
    smtp = SmtpSink().start()
    try:
        http = HttpSink().start()
        try:
            yield smtp, http
        finally:
            http.stop()
    finally:
        smtp.stop()


def run(work_dir: Path) -> bool:
    """The demo itself; DemoFailed on any problem. True when `work_dir` is worth keeping."""
    started = time.monotonic()
    warnings = []
    log_path = work_dir / "nudge-up.log"
    state_dir = work_dir / "state"
    with sinks() as (smtp, http):
        *service_ports, nats_port = free_ports(len(SERVICES) + 1)
        addresses = {n: f"127.0.0.1:{p}" for n, p in zip(SERVICES, service_ports, strict=True)}
        env = base_env()
        env.update({f"NUDGE_{name.upper()}_ADDR": addr for name, addr in addresses.items()})
        env["NUDGE_NATS_PORT"] = str(nats_port)

        say("Nudge demo: campaigns as code, events in through gRPC, messages out by SMTP and HTTP")
        say(f"   SMTP sink on {smtp.url}, HTTP sink on {http.url}")

        up = NudgeUp(state_dir, log_path, smtp.url, env)
        step(1, "Start the stack (embedded Postgres, nats-server, the four services)")
        say(f"   $ {' '.join(shlex.quote(a) for a in up.command)}")
        say(f"     (free ports; service logs in {log_path})")
        up.start()
        try:
            ready, api_key = up.wait_ready(READY_TIMEOUT_S)
            say(f"     {ready}")
            say(f"     api key: {api_key[:16]}...")
            env["NUDGE_API_KEY"] = api_key
            env["NUDGE_STATE_DIR"] = str(state_dir)
            cli = Cli(env)

            step(2, "Apply the campaigns in examples/campaigns/")
            files = sorted(CAMPAIGNS.glob("*.yaml"))
            if not files:
                raise DemoFailed(f"no campaign files in {CAMPAIGNS}")
            cli.run("campaigns", "apply", *(str(f.relative_to(REPO)) for f in files))

            step(3, "Identify users (traits used by the templates and the webhook URL)")
            people = users(f"{http.url}/crm")
            first, *others = people
            cli.run(
                "identify",
                "--user",
                first.user_id,
                "--traits",
                compact(first.traits),
                "--event-id",
                f"identify-{first.user_id}",
            )
            say("   gRPC IngestService.Identify (as an SDK would):")
            for user in others:
                outcome = grpc_identify(addresses["ingest"], api_key, user)
                say(f"     {outcome} {user.user_id} {compact(user.traits)}")

            step(4, "Track events through the public gRPC API")
            event = CLI_EVENT
            cli.run(
                "track",
                "--user",
                event.user_id,
                "--event",
                event.name,
                "--props",
                compact(event.properties),
                "--event-id",
                event.event_id,
            )
            say(f"   gRPC IngestService.Track, {len(GRPC_EVENTS)} events in one request:")
            outcomes = grpc_track(addresses["ingest"], api_key, GRPC_EVENTS)
            width = max(len(e.event_id) for e in GRPC_EVENTS)
            for e, outcome in zip(GRPC_EVENTS, outcomes, strict=True):
                say(
                    f"     {outcome:<9} {e.event_id:<{width}} {e.user_id:<6} {e.name:<14}"
                    f" {compact(e.properties)}  -> {e.note}"
                )
            expected_outcomes = ["accepted"] * (len(GRPC_EVENTS) - 1) + ["duplicate"]
            if outcomes != expected_outcomes:
                raise DemoFailed(f"unexpected Track outcomes: {outcomes}")
            tracked_at = time.monotonic()

            step(
                5,
                f"Wait for {len(EXPECTED_MAIL)} emails and {len(EXPECTED_WEBHOOKS)} webhooks "
                f"(at most {DELIVERY_TIMEOUT_S:.0f} s)",
            )
            deadline = tracked_at + DELIVERY_TIMEOUT_S
            wait_deliveries(smtp, http, deadline)
            mails, hooks = smtp.messages, http.requests
            master = (state_dir / "webhook-secret").read_text(encoding="utf-8").strip()
            secret = workspace_secret(master, "dev")  # what `nudge webhooks secret` prints
            check_deliveries(mails, hooks, secret)
            show_deliveries(mails, hooks, secret)

            step(6, "What dispatch recorded (DispatchService.ListMessages)")
            wait_messages_final(
                addresses["dispatch"], api_key, [u.user_id for u in people], deadline
            )
            cli.run("messages", "grace")
            engine_mails = len(smtp.messages)
            last = campaign_engine(cli, addresses["ingest"], api_key, smtp, 7)
            engine_mails = len(smtp.messages) - engine_mails
            experiment_mails = len(smtp.messages)
            last = experiment(cli, addresses["ingest"], api_key, smtp, last)
            experiment_mails = len(smtp.messages) - experiment_mails

            step(last, "Stop the stack")
            say("   SIGTERM to `nudge up`")
            stopping = time.monotonic()
            rc = up.stop(STOP_TIMEOUT_S)
            if rc != 0:
                raise DemoFailed(f"`nudge up` exited with rc={rc} after SIGTERM")
            say(f"     nudge up exited 0 after {time.monotonic() - stopping:.1f} s")
            for line in up.lines():
                if "did not stop in time" in line:  # a service that does not drain: a bug
                    warnings.append(line.removeprefix("nudge: "))
            for warning in warnings:
                say(f"     warning: {warning} (log kept: {log_path})")
        finally:
            up.close()
    say()
    say(
        f"Demo OK: {len(mails)} emails and {len(hooks)} webhooks delivered as expected, then "
        f"{engine_mails} campaign-engine emails over 14 skipped days, nothing else; replay "
        f"equals live; {experiment_mails} experiment emails, and the planted difference "
        f"recovered; {time.monotonic() - started:.1f} s."
    )
    return bool(warnings)


def main() -> int:
    """Run the demo in a fresh temporary directory; 0 on success, 1 on failure."""
    # Not under a 0700 per-user temp dir chain only we can traverse: as root, Postgres runs as
    # another user, and nudge.dev.stack makes the ancestors traversable for it.
    work_dir = Path(tempfile.mkdtemp(prefix="nudge-demo-"))
    log_path = work_dir / "nudge-up.log"
    try:
        keep = run(work_dir)
    except DemoFailed as error:
        print(f"\ndemo FAILED: {error}", file=sys.stderr, flush=True)
        if log_path.exists():
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
            print(f"\nlast lines of {log_path}:", file=sys.stderr)
            print(indent("\n".join(tail), "  "), file=sys.stderr)
        print(f"\nfull log: {log_path} (directory kept: {work_dir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; logs in {work_dir}", file=sys.stderr)
        return 130
    if not keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
