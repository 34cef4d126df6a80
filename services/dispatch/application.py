"""Dispatch application: record, claim, render, send, and record the outcome of each send."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import asyncpg

from nudge.clock import DbClock
from nudge.dispatch.v1 import dispatch_pb2
from nudge.protoconv import struct_to_dict
from services.dispatch import store
from services.dispatch.channels.base import (
    AmbiguousChannelError,
    Channel,
    ChannelError,
    OutboundMessage,
)
from services.dispatch.domain import ambiguous_is_retried, plan_retry
from services.dispatch.store import SendRow
from services.dispatch.templating import RenderError, render_message

log = logging.getLogger("nudge.dispatch")


class Dispatcher:
    """Turns send requests into provider requests, at most once per send_id in effect."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        channels: Mapping[str, Channel],
        clock: DbClock,
        *,
        lease: timedelta = timedelta(seconds=60),
        retry_window: timedelta = timedelta(hours=24),
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._channels = channels
        self._clock = clock
        self._lease = lease
        self._retry_window = retry_window
        self._rng = rng or random.Random()
        self._bulkheads = {name: asyncio.Semaphore(32) for name in channels}

    async def accept(self, request: dispatch_pb2.SendRequest) -> None:
        """Record a send request (idempotent by send_id) and attempt it."""
        await store.insert_planned(
            self._pool,
            send_id=request.send_id,
            workspace_id=request.workspace_id,
            user_id=request.user_id,
            campaign_id=request.campaign_id,
            campaign_version=request.campaign_version,
            channel=request.channel,
            request=request.SerializeToString(),
        )
        await self.attempt(request.send_id)

    async def attempt(self, send_id: str) -> None:
        """Claim the send and make one attempt; a no-op when another attempt owns it or it is
        finished."""
        send = await store.claim(self._pool, send_id, self._lease)
        if send is None:
            send = await store.claim_stale_attempt(self._pool, send_id, self._lease)
            if send is None:
                return
            if not await self._may_retry_interrupted(send):
                return
        await self._attempt_claimed(send)

    async def _may_retry_interrupted(self, send: SendRow) -> bool:
        # The previous attempt died between "request sent" and "outcome recorded": the provider
        # may have the message. Retrying is safe only where it cannot produce a second arrival.
        request = dispatch_pb2.SendRequest.FromString(send.request)
        channel = self._channels.get(send.channel)
        idempotent = channel is not None and channel.supports_idempotency
        if ambiguous_is_retried(channel_is_idempotent=idempotent, kind=request.kind):
            return True
        async with self._pool.acquire() as conn, conn.transaction():
            await store.mark_ambiguous(conn, send, "attempt interrupted; provider outcome unknown")
        log.warning("send %s parked as ambiguous after an interrupted attempt", send.send_id)
        return False

    async def _attempt_claimed(self, send: SendRow) -> None:
        request = dispatch_pb2.SendRequest.FromString(send.request)
        channel = self._channels.get(send.channel)
        if channel is None:
            await self._dead(send, f"channel {send.channel!r} is not configured")
            return
        context: dict[str, Any] = struct_to_dict(request.context)
        try:
            fields = render_message(dict(request.template), context)
        except RenderError as error:
            await self._dead(send, f"render failed: {error}")
            return
        message = OutboundMessage(
            send_id=send.send_id,
            workspace_id=send.workspace_id,
            user_id=send.user_id,
            channel=send.channel,
            fields=fields,
        )
        try:
            async with self._bulkheads[send.channel]:
                delivery = await channel.send(message)
        except AmbiguousChannelError as error:
            if ambiguous_is_retried(
                channel_is_idempotent=channel.supports_idempotency, kind=request.kind
            ):
                await self._retry(send, error)
            else:
                async with self._pool.acquire() as conn, conn.transaction():
                    await store.mark_ambiguous(conn, send, error.reason)
        except ChannelError as error:
            if error.retryable:
                await self._retry(send, error)
            else:
                await self._dead(send, error.reason)
        else:
            async with self._pool.acquire() as conn, conn.transaction():
                await store.mark_sent(conn, send, delivery.provider_message_id)

    async def _retry(self, send: SendRow, error: ChannelError) -> None:
        decision = plan_retry(
            attempt=send.attempts,
            reason=error.reason,
            retry_after_s=error.retry_after_s,
            created_at=send.created_at,
            now=self._clock.now(),
            window=self._retry_window,
            rng=self._rng,
        )
        if decision.next_at is None:
            await self._dead(send, decision.reason)
        else:
            await store.mark_retry(self._pool, send, decision.next_at, decision.reason)

    async def _dead(self, send: SendRow, reason: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await store.mark_dead(conn, send, reason)
        log.info("send %s dead-lettered: %s", send.send_id, reason)

    async def sweep_once(self, limit: int = 100) -> int:
        """Attempt sends whose retry is due or whose attempt lease expired; return how many."""
        send_ids = await store.due_send_ids(self._pool, limit)
        await asyncio.gather(*(self.attempt(send_id) for send_id in send_ids))
        return len(send_ids)

    async def run_sweeper(self, interval_s: float = 0.5) -> None:
        """Sweep forever."""
        while True:
            if await self.sweep_once() == 0:
                await asyncio.sleep(interval_s)
