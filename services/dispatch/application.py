"""Dispatch application: record, claim (consent, quiet hours, caps), render, send, and record
the outcome of each send; workspace policy, dead letters, unsubscribes and previews.

Flow of one send (docs/dispatch.md):
1. `record`: the request becomes a `planned` row (idempotent by send_id) and the queue message
   is acknowledged; from here on the database, not the queue, owns the work.
2. `claim`: under the user's lock, every due send of the user is decided in competition order:
   suppressed (consent, cap), held (quiet hours) or claimed (cap slot reserved).
3. `attempt`: render (and, for tracked marketing email, rewrite links and add the open pixel),
   mark `attempting` with the tracked links (committed before the provider call), call the
   channel inside its bulkhead, record the outcome with its event.
The sweeper re-finds anything a crash, a full bulkhead, a hold or a retry left in the table.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from nudge import metrics, telemetry
from nudge.clock import DbClock
from nudge.dispatch.v1 import dispatch_pb2
from nudge.protoconv import struct_to_dict
from services.dispatch import store
from services.dispatch.channels.base import (
    AmbiguousChannelError,
    Channel,
    ChannelError,
    OutboundMessage,
    UndeliverableAddressError,
)
from services.dispatch.domain import ambiguous_is_retried, plan_retry
from services.dispatch.policy import (
    Contender,
    Recipient,
    Reservation,
    Verdict,
    WorkspacePolicy,
    decide_claims,
    earliest_window_start,
    normalize_address,
    parse_policy,
    undeliverable_refusal,
    user_zone,
)
from services.dispatch.store import SendRow
from services.dispatch.templating import UNSUBSCRIBE_VARIABLE, RenderError, render_message
from services.dispatch.tracking import (
    InvalidTrackingTokenError,
    TokenKind,
    resolve_click,
    rewrite_links,
    verify_token,
)
from services.dispatch.unsubscribe import UnsubscribeLinks, UnsubscribeRequest

log = logging.getLogger("nudge.dispatch")

KINDS = ("marketing", "transactional")
PREVIEW_UNSUBSCRIBE_URL = "https://unsubscribe.invalid/preview"


def policy_of(stored: tuple[dict[str, Any], int] | None) -> WorkspacePolicy:
    """The workspace policy from its stored document (the default when none was applied)."""
    if stored is None:
        return WorkspacePolicy()
    return parse_policy(stored[0])


class ChannelLanes:
    """Bulkheads per channel: at most `concurrency` provider calls at once on a channel, and at
    most `backlog` attempts admitted per channel. A saturated channel refuses new attempts,
    which then wait in the table for the sweeper, so a hanging provider never stalls the queue
    consumer, the sweeper, or any other channel."""

    def __init__(self, concurrency: int = 32, backlog: int | None = None) -> None:
        self._concurrency = concurrency
        self._backlog = backlog if backlog is not None else 4 * concurrency
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}
        self._keys: set[str] = set()

    def semaphore(self, channel: str) -> asyncio.Semaphore:
        """The bulkhead around provider calls on `channel`."""
        found = self._semaphores.get(channel)
        if found is None:
            found = self._semaphores[channel] = asyncio.Semaphore(self._concurrency)
        return found

    def saturated(self) -> list[str]:
        """Channels that admit no more work now."""
        return [name for name, tasks in self._tasks.items() if len(tasks) >= self._backlog]

    def admit(self, channel: str, key: str, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Start `work()` as a task unless the channel is saturated or `key` already runs."""
        tasks = self._tasks.setdefault(channel, set())
        if key in self._keys or len(tasks) >= self._backlog:
            return False
        task = asyncio.create_task(work(), name=f"send {key}")
        tasks.add(task)
        self._keys.add(key)

        def done(finished: asyncio.Task[None]) -> None:
            tasks.discard(finished)
            self._keys.discard(key)
            if not finished.cancelled() and finished.exception() is not None:
                log.error(
                    "attempt of send %s failed; the sweeper will pick it up again",
                    key,
                    exc_info=finished.exception(),
                )

        task.add_done_callback(done)
        return True

    async def wait_idle(self) -> None:
        """Wait until every admitted attempt has finished (tests, drain)."""
        while True:
            pending = [task for tasks in self._tasks.values() for task in tasks]
            if not pending:
                return
            await asyncio.wait(pending)

    async def drain(self, grace_s: float) -> None:
        """Let running attempts finish for up to `grace_s`, then cancel the rest (their sends
        stay claimed/attempting and are recovered after the lease)."""
        try:
            await asyncio.wait_for(self.wait_idle(), timeout=grace_s)
        except TimeoutError:
            pending = [task for tasks in self._tasks.values() for task in tasks]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


@dataclass(frozen=True)
class TrackingConfig:
    """Open and click tracking: the public base URL of the `/o/` and `/c/` endpoints and the
    key that signs their tokens. A dispatcher without one tracks nothing."""

    base_url: str
    secret: bytes


@dataclass(frozen=True)
class Claimed:
    """A send this worker claimed, with the recipient facts read in the claim transaction."""

    send: SendRow
    recipient: Recipient


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
        channel_concurrency: int = 32,
        pickup_grace: timedelta = timedelta(seconds=5),
        unsubscribe_links: UnsubscribeLinks | None = None,
        contender_limit: int = 100,
        tracking: TrackingConfig | None = None,
    ) -> None:
        self._pool = pool
        self._channels = channels
        self._clock = clock
        self._lease = lease
        self._retry_window = retry_window
        self._rng = rng or random.Random()
        self._pickup_grace = min(pickup_grace, lease)
        self._links = unsubscribe_links
        self._contender_limit = contender_limit
        self._tracking = tracking
        self.lanes = ChannelLanes(channel_concurrency)

    # ---------------------------------------------------------------------------- intake

    async def record(self, request: dispatch_pb2.SendRequest) -> bool:
        """Record a send request as planned (idempotent by send_id); True when new."""
        decided_at = request.decided_at.ToDatetime() if request.HasField("decided_at") else None
        return await store.insert_planned(
            self._pool,
            send_id=request.send_id,
            workspace_id=request.workspace_id,
            user_id=request.user_id,
            campaign_id=request.campaign_id,
            campaign_version=request.campaign_version,
            channel=request.channel,
            request=request.SerializeToString(),
            kind=request.kind if request.kind in KINDS else "marketing",
            priority=request.priority,
            decided_at=None if decided_at is None else decided_at.replace(tzinfo=UTC),
            pickup_grace=self._pickup_grace,
            traceparent=telemetry.current_traceparent() or "",
            experiment_group=request.experiment_group,
        )

    def submit(self, send_id: str, channel: str, traceparent: str = "") -> bool:
        """Attempt the send in the background unless its channel is saturated (then the
        sweeper picks it up once its pickup deadline passes). `traceparent`: the trace the
        request arrived in, continued by an attempt started outside it (the sweeper's)."""
        if not traceparent:
            return self.lanes.admit(channel, send_id, lambda: self.attempt(send_id))
        return self.lanes.admit(
            channel, send_id, lambda: self._attempt_in_trace(send_id, channel, traceparent)
        )

    async def _attempt_in_trace(self, send_id: str, channel: str, traceparent: str) -> None:
        with telemetry.continued_span(
            "attempt send",
            traceparent,
            attributes={"nudge.send_id": send_id, "nudge.channel": channel},
        ):
            await self.attempt(send_id)

    async def accept(self, request: dispatch_pb2.SendRequest) -> None:
        """Record a send request and attempt it now (waits for the outcome)."""
        await self.record(request)
        await self.attempt(request.send_id)

    # ---------------------------------------------------------------------------- claim

    async def attempt(self, send_id: str) -> None:
        """Claim the send (and the user's other due sends) and attempt what was claimed; a
        no-op when the send is not claimable (finished, held, or someone else's)."""
        claimed = await self.claim(send_id)
        if claimed:
            await asyncio.gather(*(self._attempt_claimed(item) for item in claimed))

    async def claim(self, send_id: str) -> list[Claimed]:
        """Decide every due send of the send's user under the user's lock (docs/dispatch.md);
        return the sends claimed for this worker."""
        owner = await store.open_send_owner(self._pool, send_id)
        if owner is None:
            return []
        workspace_id, user_id = owner
        async with self._pool.acquire() as conn, conn.transaction():
            now = await store.lock_user(conn, workspace_id, user_id)
            rows = await store.contenders(conn, workspace_id, user_id, now, self._contender_limit)
            if not rows:
                return []
            policy = policy_of(await store.load_policy(conn, workspace_id))
            facts = await store.recipient(conn, workspace_id, user_id)
            tz = user_zone(facts.timezone, policy.default_timezone)
            since = earliest_window_start(now, tz, policy)
            reservations = (
                []
                if since is None
                else [
                    Reservation(channel, at)
                    for channel, at in await store.cap_reservations(
                        conn, workspace_id, user_id, since
                    )
                ]
            )
            decisions = decide_claims(
                [_contender(row) for row in rows],
                recipient=facts,
                policy=policy,
                reservations=reservations,
                now=now,
                tz=tz,
            )
            by_id = {row.send_id: row for row in rows}
            claimed: list[Claimed] = []
            for decision in decisions:
                row = by_id[decision.send_id]
                if decision.verdict is Verdict.ATTEMPT:
                    taken = await store.mark_claimed(
                        conn, row, self._lease, reserve_cap=decision.reserve_cap, now=now
                    )
                    if taken is not None:
                        claimed.append(Claimed(taken, facts))
                elif decision.verdict is Verdict.HOLD:
                    assert decision.next_at is not None
                    await store.mark_held(conn, row, decision.next_at, decision.reason)
                else:
                    await store.mark_suppressed(conn, row, decision.code, decision.reason)
                    metrics.count_send(row.channel, "suppressed")
                    log.info("send %s suppressed: %s", row.send_id, decision.reason)
        return claimed

    # ---------------------------------------------------------------------------- attempt

    async def _attempt_claimed(self, claimed: Claimed) -> None:
        send = claimed.send
        assert send.request is not None  # claims select it
        request = dispatch_pb2.SendRequest.FromString(send.request)
        channel = self._channels.get(send.channel)
        if channel is None:
            await self._dead(send, f"channel {send.channel!r} is not configured")
            return
        context: dict[str, Any] = struct_to_dict(request.context)
        unsubscribe_url = self._unsubscribe_url(send)
        context[UNSUBSCRIBE_VARIABLE] = unsubscribe_url or ""
        try:
            fields = render_message(dict(sorted(request.template.items())), context)
        except RenderError as error:
            await self._dead(send, f"render failed: {error}")
            return
        refusal = undeliverable_refusal(send.channel, fields.get("to", ""), claimed.recipient)
        if refusal is not None:
            async with self._pool.acquire() as conn, conn.transaction():
                await store.mark_suppressed(conn, send, *refusal)
            metrics.count_send(send.channel, "suppressed")
            return
        fields, tracked_links = self._track(send, fields, unsubscribe_url)
        message = OutboundMessage(
            send_id=send.send_id,
            workspace_id=send.workspace_id,
            user_id=send.user_id,
            channel=send.channel,
            fields=fields,
            unsubscribe_url=unsubscribe_url,
        )
        async with self.lanes.semaphore(send.channel):
            attempting = await store.mark_attempting(self._pool, send, self._lease, tracked_links)
            if attempting is None:
                log.warning("send %s: claim lost before the attempt; skipped", send.send_id)
                return
            try:
                delivery = await channel.send(message)
            except AmbiguousChannelError as error:
                await self._ambiguous(attempting, error)
                return
            except UndeliverableAddressError as error:
                address = normalize_address(send.channel, error.address)
                await self._dead(attempting, error.reason, undeliverable_address=address)
                return
            except ChannelError as error:
                if error.retryable:
                    await self._retry(attempting, error)
                else:
                    await self._dead(attempting, error.reason)
                return
            except Exception as error:
                # A bug in a channel: we cannot tell whether the request went out.
                log.exception("channel %s raised unexpectedly", send.channel)
                unknown = AmbiguousChannelError(
                    f"channel error: {error!r}", retryable=channel.supports_idempotency
                )
                await self._ambiguous(attempting, unknown)
                return
        async with self._pool.acquire() as conn, conn.transaction():
            if not await store.mark_sent(conn, attempting, delivery.provider_message_id):
                log.warning("send %s delivered but its claim was taken over", send.send_id)
                return
        metrics.count_send(send.channel, "sent")

    def _track(
        self, send: SendRow, fields: dict[str, str], unsubscribe_url: str | None
    ) -> tuple[dict[str, str], tuple[str, ...] | None]:
        """The fields to send and the links to store with the attempt (None: not tracked).

        Only marketing email with an HTML part is tracked: a transactional message (a password
        reset) must reach its link without a detour through us, and plain text has no pixel.
        The unsubscribe link is never tracked: it goes straight to the unsubscribe page.
        """
        html_body = fields.get("html")
        tracking = self._tracking
        if tracking is None or send.channel != "email" or send.kind != "marketing":
            return fields, None
        if not html_body:
            return fields, None
        rewritten = rewrite_links(
            html_body,
            send.send_id,
            tracking.base_url,
            tracking.secret,
            untracked=() if unsubscribe_url is None else (unsubscribe_url,),
        )
        return {**fields, "html": rewritten.html}, rewritten.links

    def _unsubscribe_url(self, send: SendRow) -> str | None:
        if self._links is None or send.channel != "email" or send.kind != "marketing":
            return None
        return self._links.url(
            UnsubscribeRequest(send.workspace_id, send.user_id, send.channel, send.send_id)
        )

    async def _ambiguous(self, send: SendRow, error: AmbiguousChannelError) -> None:
        # The provider may have the message. Retrying is safe only where it cannot produce a
        # second arrival (the provider dedupes by our key) or where the campaign prefers a
        # duplicate to a loss (transactional: at-least-once). Either way it is counted. The
        # error says whether ITS provider dedupes (one `push` channel fronts APNs, which honours
        # apns-id, and FCM, which has no key); `channel.supports_idempotency` must hold for all.
        if ambiguous_is_retried(channel_is_idempotent=error.retryable, kind=send.kind):
            await self._retry(send, error, ambiguous=True)
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await store.mark_ambiguous(conn, send, error.reason)
        metrics.count_send(send.channel, "ambiguous")
        log.warning("send %s parked as ambiguous: %s", send.send_id, error.reason)

    async def _retry(self, send: SendRow, error: ChannelError, *, ambiguous: bool = False) -> None:
        decision = plan_retry(
            attempt=send.attempts,
            reason=error.reason,
            retry_after_s=error.retry_after_s,
            created_at=send.window_started_at,
            now=self._clock.now(),
            window=self._retry_window,
            rng=self._rng,
        )
        if decision.next_at is None:
            await self._dead(send, decision.reason)
        else:
            await store.mark_retry(
                self._pool, send, decision.next_at, decision.reason, ambiguous=ambiguous
            )
            metrics.count_retry(send.channel)

    async def _dead(
        self, send: SendRow, reason: str, *, undeliverable_address: str | None = None
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            done = await store.mark_dead(
                conn, send, reason, undeliverable_address=undeliverable_address
            )
        if done:
            metrics.count_send(send.channel, "dead")
            log.info("send %s dead-lettered: %s", send.send_id, reason)

    # ---------------------------------------------------------------------------- sweeper

    async def settle_stale_attempts(self, limit: int = 100) -> int:
        """Attempts whose lease expired mid-call (worker died or hung): the provider outcome is
        unknown. Park them as ambiguous, or schedule a retry where that is safe; counted."""
        stale = await store.stale_attempts(self._pool, limit)
        for send in stale:
            channel = self._channels.get(send.channel)
            idempotent = channel is not None and channel.supports_idempotency
            reason = "attempt interrupted; provider outcome unknown"
            if ambiguous_is_retried(channel_is_idempotent=idempotent, kind=send.kind):
                await store.mark_retry(self._pool, send, self._clock.now(), reason, ambiguous=True)
                metrics.count_retry(send.channel)
            else:
                async with self._pool.acquire() as conn, conn.transaction():
                    await store.mark_ambiguous(conn, send, reason)
                metrics.count_send(send.channel, "ambiguous")
                log.warning(
                    "send %s parked as ambiguous after an interrupted attempt", send.send_id
                )
        return len(stale)

    async def sweep_once(self, limit: int = 100) -> int:
        """Start attempts of due sends (never waits for them); return how many started."""
        await self.settle_stale_attempts(limit)
        due = await store.due_sends(self._pool, limit, self.lanes.saturated())
        return sum(
            1 for send_id, channel, traceparent in due if self.submit(send_id, channel, traceparent)
        )

    async def run_sweeper(self, interval_s: float = 0.5) -> None:
        """Sweep forever."""
        while True:
            if await self.sweep_once() == 0:
                await asyncio.sleep(interval_s)
            else:
                await asyncio.sleep(0)

    async def drain(self, grace_s: float = 5.0) -> None:
        """Finish or cancel running attempts (shutdown)."""
        await self.lanes.drain(grace_s)


def _contender(row: SendRow) -> Contender:
    return Contender(
        send_id=row.send_id,
        channel=row.channel,
        kind=row.kind,
        priority=row.priority,
        decided_at=row.decided_at,
        holds_cap_slot=row.holds_cap_slot,
    )


# -------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class AppliedPolicy:
    policy: WorkspacePolicy
    version: int
    changed: bool


async def apply_policy(
    pool: asyncpg.Pool, workspace_id: str, document: Mapping[str, Any]
) -> AppliedPolicy:
    """Validate and store a workspace policy (PolicyError names the bad field); a new version
    only when the normalized document changed. In force for every claim that starts after."""
    policy = parse_policy(document)
    async with pool.acquire() as conn, conn.transaction():
        version, changed = await store.save_policy(conn, workspace_id, policy.to_dict())
    return AppliedPolicy(policy, version, changed)


async def current_policy(pool: asyncpg.Pool, workspace_id: str) -> tuple[WorkspacePolicy, int]:
    """The policy in force and its version (0: the default, never applied)."""
    stored = await store.load_policy(pool, workspace_id)
    return policy_of(stored), 0 if stored is None else stored[1]


# -------------------------------------------------------------------------------- unsubscribe


class Unsubscriber:
    """Records one-click unsubscribes (RFC 8058) as `$identify` events."""

    def __init__(self, pool: asyncpg.Pool, links: UnsubscribeLinks) -> None:
        self._pool = pool
        self._links = links

    def verify(self, token: str) -> UnsubscribeRequest:
        """The request a token stands for (InvalidTokenError if it is not genuine)."""
        return self._links.verify(token)

    async def unsubscribe(self, request: UnsubscribeRequest) -> bool:
        """Unsubscribe the user from the channel; True when that changed something. Effective
        for every claim that starts after this returns (the projection is inline)."""
        # A fresh event id each time: the same link may be used again after a re-subscribe.
        event_id = f"unsubscribe:{request.send_id}:{uuid.uuid4().hex}"
        async with self._pool.acquire() as conn, conn.transaction():
            return await store.append_unsubscribe(
                conn,
                request.workspace_id,
                request.user_id,
                request.channel,
                request.send_id,
                event_id,
            )


# -------------------------------------------------------------------------------- tracking


class Tracker:
    """Records opens and clicks of tracked email as `message.opened` / `message.clicked`.

    Both are ordinary events appended to the store, like the other outcome events, so the
    rules projection counts them (`user.events['message.clicked']`). Each is recorded once:
    the first open of a send, the first click of each of its links.
    """

    def __init__(self, pool: asyncpg.Pool, secret: bytes) -> None:
        self._pool = pool
        self._secret = secret

    async def opened(self, token: str) -> bool:
        """Record the open a pixel token stands for; True when it was the first. A token that
        is not a genuine open token, or names no send, records nothing (False)."""
        try:
            verified = verify_token(token, self._secret)
        except InvalidTrackingTokenError:
            return False
        if verified.kind is not TokenKind.OPEN:
            return False
        async with self._pool.acquire() as conn, conn.transaction():
            found = await store.tracked_send(conn, verified.send_id)
            if found is None:
                return False
            return await store.append_engagement(conn, found[0], "opened", "opened", {})

    async def clicked(self, token: str) -> str:
        """The URL a click token redirects to, recording the click (once per link).

        Raises InvalidTrackingTokenError for anything that is not a genuine click token of a
        link stored with its send: the caller must then not redirect anywhere. A click whose
        event cannot be recorded still redirects (logged): the reader's way to the link
        matters more than the count.
        """
        verified = verify_token(token, self._secret)  # before any database work
        found = await store.tracked_send(self._pool, verified.send_id)
        if found is None:
            raise InvalidTrackingTokenError("no message with this id")
        send, links = found
        url = resolve_click(verified, links or ())
        properties = {"link_index": verified.index, "url": url}
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                key = f"clicked:{verified.index}"
                await store.append_engagement(conn, send, "clicked", key, properties)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("click on send %s not recorded: %r", send.send_id, error)
        return url


# -------------------------------------------------------------------------------- preview


@dataclass(frozen=True)
class Preview:
    """A rendered message that was not sent, and what the policy would do with it now."""

    fields: dict[str, str]
    error: str
    error_field: str
    verdict: str
    reason: str
    hold_until: datetime | None


async def preview(
    pool: asyncpg.Pool,
    *,
    workspace_id: str,
    user_id: str,
    channel: str,
    kind: str,
    template: Mapping[str, str],
    context: Mapping[str, Any],
) -> Preview:
    """Render like a real send and evaluate consent, quiet hours and caps read-only.

    `{{ unsubscribe_url }}` renders as a placeholder (`PREVIEW_UNSUBSCRIBE_URL`) for marketing
    email: a real link would unsubscribe the user when somebody clicks it in the preview."""
    fields: dict[str, str] = {}
    error = error_field = ""
    preview_url = PREVIEW_UNSUBSCRIBE_URL if channel == "email" and kind == "marketing" else ""
    context = {**context, UNSUBSCRIBE_VARIABLE: preview_url}
    try:
        fields = render_message(dict(sorted(template.items())), context)
    except RenderError as failure:
        error, error_field = failure.reason, failure.field
    async with pool.acquire() as conn:
        now = await conn.fetchval("SELECT nudge_now()")
        policy = policy_of(await store.load_policy(conn, workspace_id))
        facts = await store.recipient(conn, workspace_id, user_id)
        tz = user_zone(facts.timezone, policy.default_timezone)
        since = earliest_window_start(now, tz, policy)
        used = (
            []
            if since is None
            else [
                Reservation(c, at)
                for c, at in await store.cap_reservations(conn, workspace_id, user_id, since)
            ]
        )
    probe = Contender("preview", channel, kind if kind in KINDS else "marketing", 0, now)
    [decision] = decide_claims(
        [probe], recipient=facts, policy=policy, reservations=used, now=now, tz=tz
    )
    verdict, reason = decision.verdict.value, decision.reason
    if verdict == "attempt" and fields:
        refusal = undeliverable_refusal(channel, fields.get("to", ""), facts)
        if refusal is not None:
            verdict, reason = "suppress", refusal[1]
    return Preview(
        fields,
        error,
        error_field,
        "send" if verdict == "attempt" else verdict,
        reason,
        decision.next_at,
    )
