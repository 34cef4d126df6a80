"""Issue 6 end to end: the abandoned-cart experiment (control 20%, a 1 h and a 24 h reminder)
on a simulated population whose purchases depend on what each user experienced, with time
skipping, the four services as processes, a real SMTP peer and open/click tracking over HTTP.

The population: 800 users fill a cart. Every 20th buys it half an hour later, before any
reminder (the exception cancels the instance in every group). Of the users who get the 1 h
reminder, 2 in 5 open it, click the link and buy an hour later; of the users who get the 24 h
reminder and of the control users (who get nothing), 1 in 10 buys the day after. The test
plants these purchases itself, so it knows every count the stats must report: the stats must
recover them exactly, find the 1 h reminder better than control with the p-value of an
independently computed two-proportion test, and not declare the 24 h reminder a winner. A
control user never receives a message; replay recomputes every assignment; a backtest of the
same campaign over the recorded history equals what the campaign did live.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct, to_timestamp
from nudge.rules.v1 import rules_pb2
from nudge.testing.sinks import ReceivedMail
from tests.e2e.client import PAST_DUE, Nudge
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

USERS = 800
WAIT_S = 60.0
FIRST_REMINDER = "You left something in your cart"
SECOND_REMINDER = "Still thinking about it?"
EXPERIMENT = {
    "control": 20,
    "variants": [
        {"name": "wait-1h", "weight": 50, "delay": "1h"},
        {"name": "wait-24h", "weight": 50, "delay": "24h", "message": {"subject": SECOND_REMINDER}},
    ],
}
CONVERSION = {
    "event": "purchase",
    "within": "3d",
    "match": "conversion.properties.cart_id == trigger.properties.cart_id",
}
MESSAGE = {
    "channel": "email",
    "to": "{{ user.traits.email }}",
    "subject": FIRST_REMINDER,
    "body": "Cart {{ trigger.properties.cart_id }} is still waiting for you.",
    "html": "<p>Cart {{ trigger.properties.cart_id }} is waiting.</p>"
    '<a href="https://shop.example/cart/{{ trigger.properties.cart_id }}">Back to my cart</a>',
}


@pytest.fixture
def stack_tracking() -> bool:
    return True


def user(n: int) -> str:
    return f"u{n:04}"


def cart(user_id: str) -> str:
    return f"cart-{user_id}"


def tracking_links(mail: ReceivedMail) -> tuple[str, str]:
    """The open pixel and the (rewritten) cart link of a received reminder."""
    found = mail.links()
    [pixel] = [src for src in found.images if "/o/" in src]
    [link] = found.hrefs
    assert "/c/" in link, link
    return pixel, link


def open_and_click(mail: ReceivedMail) -> str:
    """What a mail client does: load the pixel, then follow the link; returns where the click
    redirects to."""
    pixel, link = tracking_links(mail)
    with urllib.request.urlopen(pixel, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/gif"
    url = urllib.parse.urlsplit(link)
    connection = http.client.HTTPConnection(url.netloc, timeout=10)
    try:
        connection.request("GET", url.path)
        reply = connection.getresponse()
        assert reply.status == 302
        return str(reply.headers["Location"])
    finally:
        connection.close()


def load(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


async def track(stack: Stack, events: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Track events in batches over one channel (what an SDK's batching does)."""
    auth = (("authorization", f"Bearer {stack.api_key}"),)
    async with grpc.aio.insecure_channel(stack.address("ingest")) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        for start in range(0, len(events), 200):
            batch = [
                ingest_pb2.Event(
                    event_id=f"{name}-{user_id}",
                    user_id=user_id,
                    name=name,
                    properties=dict_to_struct(properties),
                )
                for user_id, name, properties in events[start : start + 200]
            ]
            response = await stub.Track(
                ingest_pb2.TrackRequest(events=batch), metadata=auth, timeout=30
            )
            statuses = {r.status for r in response.results}
            assert statuses == {ingest_pb2.EVENT_STATUS_ACCEPTED}, response


async def eventually(what: str, probe: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float:
    """The pooled two-proportion z-test, two-sided (computed here, independently of Nudge)."""
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (x1 / n1 - x2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


async def test_the_abandoned_cart_experiment_recovers_the_planted_difference(
    stack: Stack,
) -> None:
    nudge = Nudge(stack)
    definition = await nudge.apply(
        "abandoned-cart.yaml", experiment=EXPERIMENT, conversion=CONVERSION, message=MESSAGE
    )
    assert definition.version == 1
    db = await asyncpg.connect(stack.database_url)
    try:
        await run_experiment(stack, nudge, db)
    finally:
        await db.close()


async def run_experiment(stack: Stack, nudge: Nudge, db: asyncpg.Connection) -> None:
    workspace = stack.workspace_id
    users = [user(n) for n in range(USERS)]
    started: datetime = await db.fetchval("SELECT nudge_now()")
    auth = (("authorization", f"Bearer {stack.api_key}"),)
    async with grpc.aio.insecure_channel(stack.address("ingest")) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        for chunk in range(0, USERS, 50):
            await asyncio.gather(
                *(
                    stub.Identify(
                        ingest_pb2.IdentifyRequest(
                            user_id=u, traits=dict_to_struct({"email": f"{u}@example.test"})
                        ),
                        metadata=auth,
                        timeout=30,
                    )
                    for u in users[chunk : chunk + 50]
                )
            )
    await track(stack, [(u, "add_to_cart", {"cart_id": cart(u), "value": 40}) for u in users])

    async def instance_states() -> dict[str, tuple[str, str]]:
        rows = await db.fetch(
            "SELECT user_id, experiment_group, state FROM campaign_instances"
            " WHERE workspace_id = $1",
            workspace,
        )
        return {r["user_id"]: (r["experiment_group"], r["state"]) for r in rows}

    async def all_entered() -> bool:
        return len(await instance_states()) == USERS

    await eventually("every user to enter", all_entered)
    groups = {u: group for u, (group, _) in (await instance_states()).items()}
    members = {g: sorted(u for u in users if groups[u] == g) for g in set(groups.values())}
    assert set(members) == {"control", "wait-1h", "wait-24h"}
    assert len(members["control"]) >= 100  # 20% of 800: ~160, ≥ 100 by more than 5 sd

    # Half an hour in: every 20th user buys the cart, before any reminder.
    await nudge.advance(timedelta(minutes=30))
    early = users[::20]
    await track(stack, [(u, "purchase", {"cart_id": cart(u)}) for u in early])

    async def early_cancelled() -> bool:
        states = await instance_states()
        return sum(state == "cancelled" for _, state in states.values()) == len(early)

    await eventually("the early purchases to cancel their reminders", early_cancelled)

    # One hour in: the 1 h reminders go out; control users are held out.
    await nudge.advance(timedelta(minutes=30) + PAST_DUE)
    first_arm = [u for u in members["wait-1h"] if u not in early]
    mails = await asyncio.to_thread(stack.smtp.wait_for, len(first_arm), WAIT_S)

    async def first_hour_decided() -> bool:
        states = await instance_states()
        return all(state != "pending" for group, state in states.values() if group != "wait-24h")

    await eventually("the 1 h and control instances to be decided", first_hour_decided)
    received = {mail.rcpt_tos[0].split("@")[0]: mail for mail in mails}
    assert sorted(received) == first_arm
    assert {mail.subject for mail in mails} == {FIRST_REMINDER}

    # Two of five 1 h recipients open, click and buy; a third opens only.
    await nudge.advance(timedelta(hours=1))
    first_buyers = [u for i, u in enumerate(first_arm) if i % 5 < 2]
    openers_only = [u for i, u in enumerate(first_arm) if i % 5 == 2]
    for u in first_buyers:
        target = await asyncio.to_thread(open_and_click, received[u])
        assert target == f"https://shop.example/cart/{cart(u)}"
    for u in openers_only:
        pixel, _ = tracking_links(received[u])
        assert (await asyncio.to_thread(load, pixel)).startswith(b"GIF")
    await track(stack, [(u, "purchase", {"cart_id": cart(u)}) for u in first_buyers])

    # A day in: the 24 h reminders go out; then one in ten of them, and of control, buys.
    await nudge.advance(timedelta(hours=22))
    second_arm = [u for u in members["wait-24h"] if u not in early]
    all_mails = await asyncio.to_thread(
        stack.smtp.wait_for, len(first_arm) + len(second_arm), WAIT_S
    )
    second = {
        mail.rcpt_tos[0].split("@")[0]: mail for mail in all_mails if mail.subject != FIRST_REMINDER
    }
    assert sorted(second) == second_arm
    assert {mail.subject for mail in second.values()} == {SECOND_REMINDER}
    control = [u for u in members["control"] if u not in early]
    second_buyers = second_arm[::10]
    control_buyers = control[::10]
    await nudge.advance(timedelta(hours=1))
    await track(stack, [(u, "purchase", {"cart_id": cart(u)}) for u in second_buyers])
    await track(stack, [(u, "purchase", {"cart_id": cart(u)}) for u in control_buyers])
    await nudge.advance(timedelta(days=4))
    finished: datetime = await db.fetchval("SELECT nudge_now()")

    buyers = {*early, *first_buyers, *second_buyers, *control_buyers}

    async def converted() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM campaign_conversions WHERE workspace_id = $1", workspace
        )
        return bool(count == len(buyers))

    await eventually("every purchase to be projected as a conversion", converted)

    async def stats() -> rules_pb2.GetCampaignStatsResponse:
        response: rules_pb2.GetCampaignStatsResponse = await nudge.rules(
            "GetCampaignStats", rules_pb2.GetCampaignStatsRequest(campaign_id="abandoned-cart")
        )
        return response

    expected_opened = len(first_buyers) + len(openers_only)

    async def outcomes_recorded() -> bool:
        rows = {row.group: row for row in (await stats()).groups}
        return (
            rows["wait-1h"].sent == len(first_arm)
            and rows["wait-24h"].sent == len(second_arm)
            and rows["wait-1h"].opened == expected_opened
            and rows["wait-1h"].clicked == len(first_buyers)
        )

    await eventually("dispatch's outcome and engagement events", outcomes_recorded)
    report = await stats()
    rows = {row.group: row for row in report.groups}
    assert [row.group for row in report.groups] == ["control", "wait-1h", "wait-24h"]
    assert report.baseline == "control"
    assert report.horizon == "4d"  # the longest delay (24h) + 3d

    planted = {
        "control": {*control_buyers},
        "wait-1h": {*first_buyers},
        "wait-24h": {*second_buyers},
    }
    for group, row in rows.items():
        entered = members[group]
        cancelled = [u for u in entered if u in early]
        assert row.entered == len(entered), group
        assert row.cancelled_by_exception == len(cancelled), group
        assert row.converted == len(cancelled) + len(planted[group]), group
        assert row.converted_attributed == len(planted[group]), group
        assert row.rate == pytest.approx(row.converted / row.entered)
        assert row.rate_interval.low < row.rate < row.rate_interval.high
    assert rows["control"].held_out == len(control)
    assert rows["control"].sent == 0
    assert rows["wait-24h"].opened == 0

    # The 1 h reminder converts better than control, with the test's own p-value.
    comparison = rows["wait-1h"].comparison
    expected_p = two_proportion_p(
        rows["wait-1h"].converted,
        rows["wait-1h"].entered,
        rows["control"].converted,
        rows["control"].entered,
    )
    assert comparison.test == "z"
    assert comparison.p_value == pytest.approx(expected_p, rel=1e-6)
    assert comparison.p_value < 1e-4
    assert comparison.verdict == "better", comparison.verdict_text
    assert comparison.absolute_uplift == pytest.approx(rows["wait-1h"].rate - rows["control"].rate)
    assert comparison.uplift_interval.low > 0
    # The 24 h reminder was planted with control's purchase rate: no winner is declared.
    assert rows["wait-24h"].comparison.verdict in {"not_enough_data", "no_difference"}

    # A control user never receives a message.
    recipients = {mail.rcpt_tos[0].split("@")[0] for mail in stack.smtp.messages}
    assert not recipients & set(members["control"])
    control_outcomes = await db.fetchval(
        """SELECT count(*) FROM events WHERE workspace_id = $1 AND name LIKE 'message.%'
           AND properties->>'experiment_group' = 'control'""",
        workspace,
    )
    assert control_outcomes == 0

    # Replay recomputes every recorded assignment and equals live.
    replay: rules_pb2.VerifyProjectionResponse = await nudge.rules(
        "VerifyProjection", rules_pb2.VerifyProjectionRequest()
    )
    assert replay.match, replay
    assert replay.assignments == USERS

    await check_backtest(nudge, db, workspace, started, finished)


async def check_backtest(
    nudge: Nudge, db: asyncpg.Connection, workspace: str, started: datetime, finished: datetime
) -> None:
    """A backtest of the same definition over the recorded history equals what happened live."""
    stored = await db.fetchval(
        "SELECT definition FROM campaign_versions WHERE workspace_id = $1", workspace
    )
    before = await db.fetchval("SELECT count(*) FROM campaign_instances")
    report: rules_pb2.BacktestResponse = await nudge.rules(
        "Backtest",
        rules_pb2.BacktestRequest(
            definition=dict_to_struct(json.loads(stored)),
            from_time=to_timestamp(started - timedelta(seconds=1)),
            to_time=to_timestamp(finished),
        ),
    )
    assert await db.fetchval("SELECT count(*) FROM campaign_instances") == before
    live = await db.fetch(
        """SELECT user_id, experiment_group, state, due_at FROM campaign_instances
           WHERE workspace_id = $1""",
        workspace,
    )
    live_groups: dict[str, set[str]] = {}
    for row in live:
        live_groups.setdefault(row["experiment_group"], set()).add(row["user_id"])
    assert {g.group: set(g.users) for g in report.groups} == live_groups
    assert report.entries == USERS
    assert report.cancelled_by_exception == sum(row["state"] == "cancelled" for row in live)
    live_sends = {
        (row["user_id"], row["due_at"], "sent" if row["state"] == "sent" else "held_out")
        for row in live
        if row["state"] in ("sent", "held_out")
    }
    backtested = {
        (send.user_id, send.due_at.ToDatetime(tzinfo=started.tzinfo), send.outcome)
        for send in report.sends
    }
    assert report.sends_count == len(live_sends)
    assert backtested == live_sends
    assert report.campaign_id == "abandoned-cart"
