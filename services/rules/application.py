"""Rules application: project events into user state, evaluate campaigns, act on fired timers.

Each batch of events is applied in ONE transaction: user states, decisions, instances, outbox
items (timers to arm, sends to make) and the reader checkpoint commit together, so a crash
replays the batch with the same deterministic ids and the same result (RELIABILITY.md P2, P7).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from nudge import eventstore
from nudge.bus import BusNames
from nudge.db import Conn, Queryable
from nudge.dispatch.v1 import dispatch_pb2
from nudge.eventstore import StoredEvent
from nudge.grpcserver import InvalidArgumentError
from nudge.protoconv import dict_to_struct, to_timestamp
from nudge.scheduler.v1 import scheduler_pb2
from services.rules import store
from services.rules.cel import CompiledCampaign, compile_campaign
from services.rules.domain import (
    CampaignDefinition,
    CampaignError,
    Decision,
    DecisionKind,
    Membership,
    RecordedEvent,
    UserState,
    cel_view,
    event_view,
    evolve,
    parse_campaign,
    state_from_dict,
    state_to_dict,
)
from services.rules.evaluation import EvaluationContext, decide_at_fire, decide_on_event

log = logging.getLogger("nudge.rules")

READER = "rules"
TIMER_TOPIC = "rules"


@dataclass(frozen=True)
class LiveCampaign:
    """A compiled current campaign version with its live status."""

    compiled: CompiledCampaign
    status: str
    created_at: datetime


class CampaignCache:
    """Compiled campaigns, reloaded whenever the campaigns table changes."""

    def __init__(self) -> None:
        self._generation: tuple[int, datetime | None] | None = None
        self._by_event: dict[tuple[str, str], list[LiveCampaign]] = {}
        self._versions: dict[tuple[str, str, int], CompiledCampaign] = {}

    async def refresh(self, conn: Queryable) -> None:
        """Reload if any campaign changed since the last load."""
        generation = await store.campaigns_generation(conn)
        if generation == self._generation:
            return
        by_event: dict[tuple[str, str], list[LiveCampaign]] = {}
        for version in await store.current_campaigns(conn):
            compiled = self._compile(version)
            trigger = compiled.definition.trigger
            event_name = getattr(trigger, "event", None)
            if event_name is None:
                continue
            live = LiveCampaign(compiled, version.status, version.created_at)
            by_event.setdefault((version.workspace_id, event_name), []).append(live)
        self._by_event = by_event
        self._generation = generation

    def for_event(self, workspace_id: str, event_name: str) -> Sequence[LiveCampaign]:
        """Current campaigns whose trigger names this event."""
        return self._by_event.get((workspace_id, event_name), ())

    def _compile(self, version: store.CampaignVersion) -> CompiledCampaign:
        key = (version.workspace_id, version.campaign_id, version.version)
        compiled = self._versions.get(key)
        if compiled is None:
            definition = parse_campaign(version.definition)
            compiled = self._versions[key] = compile_campaign(definition, version.version)
        return compiled

    async def version(
        self, conn: Queryable, workspace_id: str, campaign_id: str, version: int
    ) -> tuple[CompiledCampaign, str] | None:
        """A specific version (for instances armed by an older version) and the live status."""
        stored = await store.campaign_version(conn, workspace_id, campaign_id, version)
        if stored is None:
            return None
        return self._compile(stored), stored.status


def recorded(event: StoredEvent) -> RecordedEvent:
    """The domain view of a stored event."""
    return RecordedEvent(
        workspace_id=event.workspace_id,
        user_id=event.user_id,
        event_id=event.event_id,
        name=event.name,
        occurred_at=event.occurred_at,
        received_at=event.received_at,
        properties=event.properties,
        global_position=event.global_position,
    )


def _event_document(event: RecordedEvent) -> dict[str, Any]:
    return {
        "workspace_id": event.workspace_id,
        "user_id": event.user_id,
        "event_id": event.event_id,
        "name": event.name,
        "occurred_at": event.occurred_at.isoformat(),
        "received_at": event.received_at.isoformat(),
        "properties": dict(event.properties),
        "global_position": event.global_position,
    }


def _event_from_document(doc: Mapping[str, Any]) -> RecordedEvent:
    return RecordedEvent(
        workspace_id=doc["workspace_id"],
        user_id=doc["user_id"],
        event_id=doc["event_id"],
        name=doc["name"],
        occurred_at=datetime.fromisoformat(doc["occurred_at"]),
        received_at=datetime.fromisoformat(doc["received_at"]),
        properties=doc["properties"],
        global_position=doc["global_position"],
    )


async def load_memberships(
    conn: Queryable, keys: Iterable[tuple[str, str]], exclude_instance: str | None = None
) -> dict[tuple[str, str, str], Membership]:
    """Users' history with campaigns, from their instances, by (workspace, user, campaign)."""
    pairs = list(keys)
    rows = await conn.fetch(
        """SELECT i.workspace_id, i.user_id, i.campaign_id,
                  max(i.created_at) AS last_entered_at,
                  max(i.due_at) FILTER (WHERE i.state = 'sent') AS last_sent_at,
                  coalesce(array_agg(i.correlation) FILTER (WHERE i.state = 'pending'), '{}')
                      AS pending
           FROM unnest($1::text[], $2::text[]) AS k(w, u)
           JOIN campaign_instances i ON i.workspace_id = k.w AND i.user_id = k.u
           WHERE $3::uuid IS NULL OR i.instance_id <> $3::uuid
           GROUP BY 1, 2, 3""",
        [w for w, _ in pairs],
        [u for _, u in pairs],
        exclude_instance,
    )
    return {
        (r["workspace_id"], r["user_id"], r["campaign_id"]): Membership(
            last_entered_at=r["last_entered_at"],
            last_sent_at=r["last_sent_at"],
            pending=frozenset(r["pending"]),
        )
        for r in rows
    }


@dataclass
class _Effects:
    """What one transaction writes besides states and the checkpoint."""

    decisions: list[store.DecisionRow] = field(default_factory=list)
    instances: list[store.Instance] = field(default_factory=list)
    outbox: list[store.OutboxItem] = field(default_factory=list)
    sent_instances: list[str] = field(default_factory=list)
    suppressed_instances: list[str] = field(default_factory=list)

    async def write(self, conn: Conn) -> None:
        await store.insert_instances(conn, self.instances)
        for instance_id in self.sent_instances:
            await store.set_instance_state(conn, instance_id, "sent")
        for instance_id in self.suppressed_instances:
            await store.set_instance_state(conn, instance_id, "suppressed")
        await store.insert_decisions(conn, self.decisions)
        await store.insert_outbox(conn, self.outbox)


def _decision_row(decision: Decision) -> store.DecisionRow:
    detail = dict(decision.detail)
    if decision.error:
        detail["error"] = decision.error
    if decision.due_at is not None:
        detail["due_at"] = decision.due_at.isoformat()
    if decision.send_id is not None:
        detail["send_id"] = str(decision.send_id)
        detail["branch"] = decision.branch
    return store.DecisionRow(
        workspace_id=decision.workspace_id,
        user_id=decision.user_id,
        campaign_id=decision.campaign_id,
        version=decision.version,
        instance_id=None if decision.instance_id is None else str(decision.instance_id),
        event_id=decision.event_id,
        kind=str(decision.kind),
        reason=decision.reason,
        detail=json.loads(json.dumps(detail, default=str)),
        decided_at=decision.decided_at,
    )


class Planner:
    """Turns triggered decisions into instances, timers and send requests."""

    def __init__(self, names: BusNames) -> None:
        self._names = names

    def send_request(
        self,
        campaign: CompiledCampaign,
        decision: Decision,
        trigger: RecordedEvent,
        state: UserState,
        now: datetime,
    ) -> store.OutboxItem:
        """The dispatch work item for a `send_planned` decision."""
        assert decision.branch is not None
        assert decision.send_id is not None
        branch = decision.branch
        send_id = str(decision.send_id)
        definition = campaign.definition
        message = definition.messages[branch].message
        template = {
            key: (json.dumps(value) if key == "payload" else str(value))
            for key, value in message.to_dict().items()
            if key != "channel" and value is not None
        }
        event = event_view(trigger)
        context = {
            "user": cel_view(state, now),
            "event": event,
            "trigger": event,
            "campaign": {"id": definition.id, "name": definition.name, "version": campaign.version},
        }
        request = dispatch_pb2.SendRequest(
            send_id=send_id,
            workspace_id=trigger.workspace_id,
            user_id=trigger.user_id,
            campaign_id=definition.id,
            campaign_version=campaign.version,
            channel=message.channel,
            template=template,
            context=dict_to_struct(context),
            trigger_event_id=trigger.event_id,
            decided_at=to_timestamp(now),
            kind=definition.kind,
            priority=definition.priority,
        )
        return store.OutboxItem(
            kind="dispatch",
            msg_id=send_id,
            subject=self._names.dispatch_subject(trigger.workspace_id, message.channel),
            payload=request.SerializeToString(),
        )

    @staticmethod
    def timer(instance_id: str, workspace_id: str, due_at: datetime) -> store.OutboxItem:
        """The scheduler call arming an instance's timer (timer id = instance id)."""
        request = scheduler_pb2.ScheduleRequest(
            timer=scheduler_pb2.Timer(
                timer_id=instance_id,
                workspace_id=workspace_id,
                topic=TIMER_TOPIC,
                due_at=to_timestamp(due_at),
                payload=instance_id.encode(),
            )
        )
        return store.OutboxItem("schedule", f"schedule:{instance_id}", request.SerializeToString())


class Projector:
    """Reads the store gap-free and applies each batch: state, decisions, effects, checkpoint."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: CampaignCache,
        planner: Planner,
        *,
        batch_size: int = 1000,
        on_effects: asyncio.Event | None = None,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._planner = planner
        self._batch_size = batch_size
        self._on_effects = on_effects
        self.applied_events = 0

    async def apply_once(self) -> int:
        """Apply the next batch; return how many events it had."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Replicas take turns: the checkpoint row lock serializes batches.
            await conn.execute(
                "INSERT INTO reader_checkpoints (reader) VALUES ($1) ON CONFLICT DO NOTHING",
                READER,
            )
            await conn.execute(
                "SELECT 1 FROM reader_checkpoints WHERE reader = $1 FOR UPDATE", READER
            )
            cursor = await eventstore.load_checkpoint(conn, READER)
            result = await eventstore.read_batch(conn, cursor, self._batch_size)
            if not result.events:
                await eventstore.save_checkpoint(conn, READER, cursor, result.xmin)
                return 0
            await self._cache.refresh(conn)
            effects = await self._apply(conn, [recorded(e) for e in result.events])
            await effects.write(conn)
            await eventstore.save_checkpoint(conn, READER, result.events[-1].cursor, result.xmin)
        self.applied_events += len(result.events)
        if effects.outbox and self._on_effects is not None:
            self._on_effects.set()
        return len(result.events)

    async def _apply(self, conn: Conn, events: Sequence[RecordedEvent]) -> _Effects:
        keys = {(e.workspace_id, e.user_id) for e in events}
        documents = await store.load_states(conn, keys)
        states: dict[tuple[str, str], UserState] = {
            key: state_from_dict(doc) for key, doc in documents.items()
        }
        triggered_users = {
            (e.workspace_id, e.user_id)
            for e in events
            if self._cache.for_event(e.workspace_id, e.name)
        }
        memberships = await load_memberships(conn, triggered_users) if triggered_users else {}
        effects = _Effects()
        positions: dict[tuple[str, str], int] = {}
        for event in events:
            key = (event.workspace_id, event.user_id)
            state = evolve(states.get(key), event)
            states[key] = state
            positions[key] = event.global_position
            campaigns = [
                live
                for live in self._cache.for_event(event.workspace_id, event.name)
                if event.received_at >= live.created_at
            ]
            if campaigns:
                self._evaluate(event, state, campaigns, memberships, effects)
        await store.save_states(
            conn,
            [(w, u, state_to_dict(states[(w, u)]), positions[(w, u)]) for w, u in positions],
        )
        return effects

    def _evaluate(
        self,
        event: RecordedEvent,
        state: UserState,
        campaigns: Sequence[LiveCampaign],
        memberships: dict[tuple[str, str, str], Membership],
        effects: _Effects,
    ) -> None:
        now = event.received_at
        context = EvaluationContext.for_campaigns(
            event, state, now, [live.compiled for live in campaigns]
        )
        for live in campaigns:
            campaign = live.compiled
            campaign_id = campaign.definition.id
            member_key = (event.workspace_id, event.user_id, campaign_id)
            membership = memberships.get(member_key, Membership())
            for decision in decide_on_event(
                campaign,
                event,
                state,
                membership,
                now,
                context=context,
                paused=live.status == "paused",
            ):
                effects.decisions.append(_decision_row(decision))
                if decision.kind is not DecisionKind.TRIGGERED:
                    continue
                assert decision.instance_id is not None
                assert decision.due_at is not None
                instance_id = str(decision.instance_id)
                instance = store.Instance(
                    instance_id=instance_id,
                    workspace_id=event.workspace_id,
                    campaign_id=campaign_id,
                    version=campaign.version,
                    user_id=event.user_id,
                    correlation=decision.correlation,
                    trigger_event_id=event.event_id,
                    trigger_event=_event_document(event),
                    state="pending",
                    due_at=decision.due_at,
                )
                if decision.delayed_until is None:
                    membership = self._send_now(
                        campaign, event, state, membership, instance, effects
                    )
                else:
                    effects.instances.append(instance)
                    effects.outbox.append(
                        Planner.timer(instance_id, event.workspace_id, decision.due_at)
                    )
                    membership = replace(
                        membership, pending=membership.pending | {decision.correlation}
                    )
                memberships[member_key] = membership

    def _send_now(
        self,
        campaign: CompiledCampaign,
        event: RecordedEvent,
        state: UserState,
        membership: Membership,
        instance: store.Instance,
        effects: _Effects,
    ) -> Membership:
        now = event.received_at
        decision = decide_at_fire(
            campaign, event, state, membership, now, instance=UUID(instance.instance_id)
        )
        effects.decisions.append(_decision_row(decision))
        if decision.kind is DecisionKind.SEND_PLANNED:
            effects.instances.append(replace(instance, state="sent"))
            effects.outbox.append(self._planner.send_request(campaign, decision, event, state, now))
            return replace(membership, last_sent_at=now)
        effects.instances.append(replace(instance, state="suppressed"))
        return membership


class TimerHandler:
    """Acts on fired timers once each, on state that includes every event accepted before."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: CampaignCache,
        planner: Planner,
        *,
        on_effects: asyncio.Event | None = None,
        watermark_timeout_s: float = 30.0,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._planner = planner
        self._on_effects = on_effects
        self._watermark_timeout_s = watermark_timeout_s

    async def wait_for_projection(self, snapshot_xmax: int) -> bool:
        """Wait until the projection has read under an xmin at or past `snapshot_xmax`: then
        every transaction that was in flight when the timer fired is applied (RELIABILITY.md P4).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._watermark_timeout_s
        while await store.projection_watermark(self._pool, READER) < snapshot_xmax:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def handle(self, fired: scheduler_pb2.TimerFired) -> None:
        """Re-check the instance and plan its send, or record why not. Idempotent."""
        timer = fired.timer
        now = fired.fired_at.ToDatetime(tzinfo=UTC)
        async with self._pool.acquire() as conn, conn.transaction():
            if not await store.record_inbox(conn, f"timer:{timer.timer_id}:{timer.version}"):
                return
            instance = await store.lock_instance(conn, timer.timer_id)
            if instance is None or instance.state != "pending":
                return
            found = await self._cache.version(
                conn, instance.workspace_id, instance.campaign_id, instance.version
            )
            if found is None:
                log.error("instance %s names an unknown campaign version", instance.instance_id)
                return
            campaign, status = found
            document = await store.load_state(conn, instance.workspace_id, instance.user_id)
            if document is None:
                return
            state = state_from_dict(document)
            trigger = _event_from_document(instance.trigger_event)
            memberships = await load_memberships(
                conn, [(instance.workspace_id, instance.user_id)], instance.instance_id
            )
            membership = memberships.get(
                (instance.workspace_id, instance.user_id, instance.campaign_id), Membership()
            )
            decision = decide_at_fire(
                campaign,
                trigger,
                state,
                membership,
                now,
                instance=UUID(instance.instance_id),
                paused=status == "paused",
            )
            effects = _Effects(decisions=[_decision_row(decision)])
            if decision.kind is DecisionKind.SEND_PLANNED:
                effects.sent_instances.append(instance.instance_id)
                effects.outbox.append(
                    self._planner.send_request(campaign, decision, trigger, state, now)
                )
            elif decision.kind is not DecisionKind.PAUSED:
                effects.suppressed_instances.append(instance.instance_id)
            await effects.write(conn)
        if effects.outbox and self._on_effects is not None:
            self._on_effects.set()


class CampaignAdmin:
    """Validates and stores campaign definitions."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def apply(
        self, workspace_id: str, document: Mapping[str, Any]
    ) -> tuple[store.CampaignVersion, bool]:
        """Store `document` as the next version of its campaign if it changed."""
        definition = validate_campaign(document)
        async with self._pool.acquire() as conn, conn.transaction():
            return await store.save_campaign_version(
                conn,
                workspace_id,
                definition.id,
                definition.to_dict(),
                definition.definition_hash(),
                definition.status,
            )


def validate_campaign(document: Mapping[str, Any]) -> CampaignDefinition:
    """Parse and compile a definition (CEL and templates); errors name the field."""
    from services.dispatch.templating import RenderError, validate_template

    try:
        definition = parse_campaign(document)
        compile_campaign(definition)
        for index, branch in enumerate(definition.messages):
            for name, template in branch.message.to_dict().items():
                if name == "channel" or template is None:
                    continue
                for text in _strings(template):
                    try:
                        validate_template(text)
                    except RenderError as error:
                        raise CampaignError(
                            f"messages[{index}].message.{name}", str(error)
                        ) from None
    except CampaignError as error:
        raise InvalidArgumentError(error.message, error.path) from None
    return definition


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


class UserViews:
    """Users' engagement state as CEL and templates see it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def view(self, workspace_id: str, user_id: str) -> dict[str, Any] | None:
        """The view at the current database time, or None for an unknown user."""
        document = await store.load_state(self._pool, workspace_id, user_id)
        if document is None:
            return None
        now = await self._pool.fetchval("SELECT nudge_now()")
        return cel_view(state_from_dict(document), now)
