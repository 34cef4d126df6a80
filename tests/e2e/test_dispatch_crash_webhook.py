"""Killing dispatch in the middle of a burst of webhooks: no message lost, and a receiver that
dedupes by `webhook-id` acts on each exactly once. Every repeated delivery is one the dispatcher
counted as ambiguous (cut off mid-call, retried under the same id)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest

from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc
from nudge.testing.fixtures import run_async
from nudge.testing.services import ServiceProcesses
from nudge.testing.sinks import HttpSink
from tests.e2e.conftest import _make_key

pytestmark = pytest.mark.e2e
ORDERS = 60


def campaign(hook_url: str) -> dict[str, object]:
    return {
        "id": "order-paid-hook",
        "trigger": {"event": "order_paid"},
        "reeligibility": "0s",
        "message": {
            "channel": "webhook",
            "url": hook_url,
            "payload": {"order": "{{ event.properties.order_id }}", "user": "{{ user.id }}"},
        },
    }


async def _burst_with_a_dispatch_crash(services: ServiceProcesses, api_key: str, url: str) -> None:
    auth = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(services.addresses["rules"]) as channel:
        await rules_pb2_grpc.RulesServiceStub(channel).ApplyCampaign(
            rules_pb2.ApplyCampaignRequest(definition=dict_to_struct(campaign(url))),
            metadata=auth,
            timeout=10,
        )
    async with grpc.aio.insecure_channel(services.addresses["ingest"]) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        for number in range(ORDERS):
            if number == ORDERS // 3:
                await asyncio.to_thread(services.kill, "dispatch")
                await asyncio.to_thread(services.start, "dispatch")
            event = ingest_pb2.Event(
                event_id=f"order-{number}",
                user_id=f"u{number % 7}",
                name="order_paid",
                properties=dict_to_struct({"order_id": f"order-{number}"}),
            )
            response = await ingest.Track(
                ingest_pb2.TrackRequest(events=[event]), metadata=auth, timeout=10
            )
            assert response.results[0].status == ingest_pb2.EVENT_STATUS_ACCEPTED
            await asyncio.sleep(0.01)
    await asyncio.to_thread(services.wait_serving, ["dispatch"], 60)


async def _settled_sends(database_url: str, timeout_s: float) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(int(timeout_s / 0.2)):
            rows = await conn.fetch("SELECT state, ambiguous_attempts FROM sends")
            if len(rows) == ORDERS and all(r["state"] in ("sent", "dead") for r in rows):
                return list(rows)
            await asyncio.sleep(0.2)
        return list(await conn.fetch("SELECT state, ambiguous_attempts FROM sends"))
    finally:
        await conn.close()


def test_killing_dispatch_mid_burst_loses_no_webhook_and_duplicates_none_by_id(
    database_url: str, nats_url: str, test_id: str, tmp_path: Path
) -> None:
    sink = HttpSink().start()
    services = ServiceProcesses.configure(
        database_url=database_url,
        nats_url=nats_url,
        nats_prefix=f"t{test_id}",
        log_dir=tmp_path / "logs",
        extra_env={"NUDGE_DISPATCH_LEASE_S": "2", "NUDGE_DISPATCH_ACK_WAIT_S": "3"},
    )
    api_key = run_async(_make_key(database_url, f"ws-{test_id}"))
    try:
        services.start_all()
        asyncio.run(_burst_with_a_dispatch_crash(services, api_key, f"{sink.url}/hook"))
        rows = run_async(_settled_sends(database_url, timeout_s=40))
        arrivals = sink.webhook_ids()
        orders = {r.json()["order"] for r in sink.requests}
    finally:
        services.stop_all()
        sink.stop()

    assert len(rows) == ORDERS
    assert Counter(r["state"] for r in rows) == {"sent": ORDERS}
    deduped = set(arrivals)
    assert len(deduped) == ORDERS  # nothing lost
    assert orders == {f"order-{n}" for n in range(ORDERS)}
    # A receiver deduping by webhook-id acts once per send; each extra delivery is a retry of
    # an attempt cut off by the crash, and the dispatcher counted every one of them.
    assert len(arrivals) - len(deduped) <= sum(r["ambiguous_attempts"] for r in rows)
