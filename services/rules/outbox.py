"""The outbox worker: delivers what rules decided (timers to arm or cancel, sends to make).

Items are written in the transaction of the decision and deleted only after delivery, so a crash
in between delivers them again: the scheduler's Schedule/Cancel are idempotent upserts and
dispatch publishes carry `Nats-Msg-Id = send_id` (RELIABILITY.md P7: no dual writes).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from nats.js import JetStreamContext

from nudge import telemetry
from nudge.bus import trace_headers
from nudge.runtime import sleep_or_wake
from nudge.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.rules import store

log = logging.getLogger("nudge.rules.outbox")


class OutboxWorker:
    """Delivers rules_outbox items in order."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
        wake: asyncio.Event,
        *,
        batch: int = 200,
        rpc_timeout_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._js = js
        self._scheduler = scheduler
        self._wake = wake
        self._batch = batch
        self._rpc_timeout_s = rpc_timeout_s

    async def run(self, idle_poll_s: float = 1.0) -> None:
        """Deliver forever; back off while a downstream service is unavailable."""
        backoff = 0.1
        while True:
            try:
                delivered = await self.deliver_once()
                backoff = 0.1
            except Exception as error:
                log.warning("outbox delivery failed (%r); retrying in %.1fs", error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if delivered == 0:
                await sleep_or_wake(self._wake, idle_poll_s)

    async def deliver_once(self) -> int:
        """Deliver one batch; return how many items it had."""
        async with self._pool.acquire() as conn, conn.transaction():
            items = await store.claim_outbox(conn, self._batch)
            if not items:
                return 0
            publishes = []
            for _, item in items:
                if item.kind == "dispatch":
                    publishes.append(self._publish(item))
                else:
                    # Timer calls go one by one, in order: a cancel must follow its schedule.
                    await asyncio.gather(*publishes)
                    publishes = []
                    with telemetry.traceparent_as_current(item.traceparent):
                        await self._call_scheduler(item)
            await asyncio.gather(*publishes)
            await store.delete_outbox(conn, [outbox_id for outbox_id, _ in items])
            return len(items)

    async def _publish(self, item: store.OutboxItem) -> None:
        # The send continues the trace of the decision that planned it (its traceparent).
        with telemetry.producer_span(item.subject, item.msg_id, parent=item.traceparent or None):
            await self._js.publish(
                item.subject,
                item.payload,
                headers=trace_headers(item.msg_id, _trace(item.traceparent)),
            )

    async def _call_scheduler(self, item: store.OutboxItem) -> None:
        metadata = (("traceparent", item.traceparent),) if item.traceparent else None
        if item.kind == "schedule":
            await self._scheduler.Schedule(
                scheduler_pb2.ScheduleRequest.FromString(item.payload),
                timeout=self._rpc_timeout_s,
                metadata=metadata,
            )
        elif item.kind == "cancel":
            await self._scheduler.Cancel(
                scheduler_pb2.CancelRequest.FromString(item.payload),
                timeout=self._rpc_timeout_s,
                metadata=metadata,
            )
        else:
            raise ValueError(f"unknown outbox item kind {item.kind!r}")


def _trace(traceparent: str) -> dict[str, str]:
    return {"traceparent": traceparent} if traceparent else {}
