"""Killing and restarting any one service loses no accepted event and sends nothing twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest
import yaml

from nudge.dispatch.v1.dispatch_pb2 import SendRequest
from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct, struct_to_dict
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc
from nudge.testing.fixtures import run_async
from nudge.testing.services import ServiceProcesses
from nudge.testing.sinks import SmtpSink
from tests.e2e.conftest import _make_key

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "campaigns"
ORDERS = 120
USERS = 12


async def _drive_orders(
    services: ServiceProcesses, api_key: str, victim: str
) -> tuple[set[str], int]:
    """Send orders at a steady pace; kill -9 `victim` a third of the way and restart it.

    Returns the accepted order ids and how many Track calls failed (to be retried by the
    client with the same event ids, as an SDK would)."""
    auth = (("authorization", f"Bearer {api_key}"),)
    definition = yaml.safe_load((EXAMPLES / "order-shipped.yaml").read_text())
    async with grpc.aio.insecure_channel(services.addresses["rules"]) as channel:
        await rules_pb2_grpc.RulesServiceStub(channel).ApplyCampaign(
            rules_pb2.ApplyCampaignRequest(definition=dict_to_struct(definition)),
            metadata=auth,
            timeout=10,
        )
    accepted: set[str] = set()
    failures = 0
    async with grpc.aio.insecure_channel(services.addresses["ingest"]) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        for user in range(USERS):
            await ingest.Identify(
                ingest_pb2.IdentifyRequest(
                    user_id=f"u{user}", traits=dict_to_struct({"email": f"u{user}@example.test"})
                ),
                metadata=auth,
                timeout=10,
            )
        for number in range(ORDERS):
            if number == ORDERS // 3:
                await asyncio.to_thread(services.kill, victim)
                await asyncio.to_thread(services.start, victim)
            order_id = f"order-{number}"
            event = ingest_pb2.Event(
                event_id=order_id,
                user_id=f"u{number % USERS}",
                name="order_shipped",
                properties=dict_to_struct({"order_id": order_id, "total": 30, "eta": "soon"}),
            )
            while True:  # an SDK retries with the same event id until it gets an answer
                try:
                    response = await ingest.Track(
                        ingest_pb2.TrackRequest(events=[event]), metadata=auth, timeout=2
                    )
                    break
                except grpc.aio.AioRpcError:
                    failures += 1
                    await asyncio.sleep(0.2)
            assert response.results[0].status in (
                ingest_pb2.EVENT_STATUS_ACCEPTED,
                ingest_pb2.EVENT_STATUS_DUPLICATE,
            )
            accepted.add(order_id)
            await asyncio.sleep(0.02)
    await asyncio.to_thread(services.wait_serving, [victim], 60)
    return accepted, failures


async def _all_sends_settled(database_url: str, timeout_s: float) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(int(timeout_s / 0.2)):
            unsettled = await conn.fetchval(
                "SELECT (SELECT count(*) FROM sends WHERE state IN ('sent', 'ambiguous', 'dead'))"
                " < $1",
                ORDERS,
            )
            if not unsettled:
                return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def _stored_and_ambiguous(database_url: str) -> tuple[int, set[str]]:
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM events WHERE name = 'order_shipped'")
        rows = await conn.fetch("SELECT request FROM sends WHERE state = 'ambiguous'")
        ambiguous = {
            struct_to_dict(SendRequest.FromString(r["request"]).context)["event"]["properties"][
                "order_id"
            ]
            for r in rows
        }
        return int(stored), ambiguous
    finally:
        await conn.close()


@pytest.mark.parametrize("victim", ["ingest", "rules", "scheduler", "dispatch"])
def test_kill_and_restart_loses_nothing_and_sends_nothing_twice(
    victim: str, database_url: str, nats_url: str, test_id: str, tmp_path: Path
) -> None:
    smtp = SmtpSink().start()
    services = ServiceProcesses.configure(
        database_url=database_url,
        nats_url=nats_url,
        nats_prefix=f"t{test_id}",
        log_dir=tmp_path / "logs",
        extra_env={
            "NUDGE_SMTP_URL": smtp.url,
            "NUDGE_DISPATCH_LEASE_S": "2",
            "NUDGE_DISPATCH_ACK_WAIT_S": "3",
            "NUDGE_RULES_ACK_WAIT_S": "3",
        },
    )
    api_key = run_async(_make_key(database_url, f"ws-{test_id}"))
    try:
        services.start_all()
        accepted, _ = asyncio.run(_drive_orders(services, api_key, victim))
        smtp.wait_for(ORDERS - 1, timeout_s=60)
        run_async(_all_sends_settled(database_url, timeout_s=30))
        mails = smtp.messages
        stored, ambiguous = run_async(_stored_and_ambiguous(database_url))
    finally:
        services.stop_all()
        smtp.stop()
    delivered = Counter(m.subject.split()[2] for m in mails)
    assert stored == ORDERS == len(accepted)
    duplicates = {order for order, count in delivered.items() if count > 1}
    assert duplicates == set()
    missing = accepted - set(delivered)
    # The one documented exception: an email attempt cut off by the crash is parked as
    # ambiguous (marketing mail is at-most-once), never retried blindly. Attempts run
    # concurrently, so the kill can cut off each SMTP exchange in flight at that instant.
    assert missing <= ambiguous
    assert len(missing) <= 3
