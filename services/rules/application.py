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
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from nudge import eventstore, metrics, telemetry
from nudge.bus import BusNames
from nudge.db import Conn, Queryable, db_now
from nudge.dispatch.v1 import dispatch_pb2
from nudge.eventstore import StoredEvent
from nudge.grpcserver import InvalidArgumentError, NotFoundError
from nudge.logs import WORKSPACE_ATTRIBUTE
from nudge.protoconv import dict_to_struct, to_timestamp
from nudge.scheduler.v1 import scheduler_pb2
from services.rules import store
from services.rules.cel import (
    CompiledCampaign,
    compile_campaign,
)
from services.rules.domain import (
    CampaignDefinition,
    CampaignError,
    Decision,
    DecisionKind,
    Membership,
    PendingInstance,
    RecordedEvent,
    UserState,
    cel_view,
    event_view,
    evolve,
    parse_campaign,
    state_from_dict,
    state_to_dict,
)
from services.rules.evaluation import (
    EvaluationContext,
    conversion_matches,
    decide_at_fire,
    decide_exception,
    decide_on_event,
)
from services.rules.experiments import (
    GLOBAL_CONTROL,
    ExperimentError,
    GlobalControl,
    applicable_global_control,
    parse_global_control,
)

log = logging.getLogger("nudge.rules")

READER = "rules"
TIMER_TOPIC = "rules"
ASSIGNED_EVENT = "$experiment.assigned"
"""Recorded at each entry into a campaign with an experiment (or of a user held out by the
workspace's global control). `$`: the projection does not count it as user activity."""


@dataclass(frozen=True)
class LiveCampaign:
    """A compiled current campaign version with its live status."""

    compiled: CompiledCampaign
    status: str
    created_at: datetime


class CampaignCache:
    """Compiled campaigns, reloaded whenever the campaigns table changes.

    Holds every stored version (pending instances keep the version that armed them, and their
    exception rules are that version's), and indexes the current versions by the event names
    that can start them, and all versions by the event names that cancel them.
    """

    def __init__(self) -> None:
        self._generation: tuple[int, datetime | None, int] | None = None
        # Every version of a campaign, oldest first, indexed by the event names that can start
        # any of them: an event is evaluated against the version current when it was RECEIVED,
        # so a projection that lags behind an edit neither drops nor re-routes its events.
        self._by_event: dict[tuple[str, str], list[tuple[LiveCampaign, ...]]] = {}
        self._any_event: dict[str, list[tuple[LiveCampaign, ...]]] = {}
        self._exceptions: dict[tuple[str, str], frozenset[str]] = {}
        self._conversions: dict[tuple[str, str], frozenset[str]] = {}
        self._horizons: dict[tuple[str, str], timedelta] = {}
        self._global_controls: dict[str, GlobalControl] = {}
        self._versions: dict[tuple[str, str, int], CompiledCampaign] = {}

    async def refresh(self, conn: Queryable) -> None:
        """Reload if any campaign changed since the last load."""
        generation = await store.campaigns_generation(conn)
        if generation == self._generation:
            return
        all_versions = await store.all_campaign_versions(conn)
        histories: dict[tuple[str, str], list[LiveCampaign]] = {}
        for version in all_versions:
            live = LiveCampaign(self._compile(version), version.status, version.created_at)
            histories.setdefault((version.workspace_id, version.campaign_id), []).append(live)
        by_event: dict[tuple[str, str], list[tuple[LiveCampaign, ...]]] = {}
        any_event: dict[str, list[tuple[LiveCampaign, ...]]] = {}
        for (workspace_id, _), lives in sorted(histories.items()):
            history = tuple(sorted(lives, key=lambda live: live.compiled.version))
            names: set[str] = set()
            for live in history:
                if live.compiled.trigger_event_names is None:
                    any_event.setdefault(workspace_id, []).append(history)
                    break
                names |= live.compiled.trigger_event_names
            else:
                for name in sorted(names):
                    by_event.setdefault((workspace_id, name), []).append(history)
        exceptions: dict[tuple[str, str], set[str]] = {}
        conversions: dict[tuple[str, str], set[str]] = {}
        horizons: dict[tuple[str, str], timedelta] = {}
        for version in all_versions:
            compiled = self._compile(version)
            for rule in compiled.definition.exceptions:
                exceptions.setdefault((version.workspace_id, rule.event), set()).add(
                    version.campaign_id
                )
            conversion = compiled.definition.conversion
            if conversion is not None and compiled.horizon is not None:
                key = (version.workspace_id, conversion.event)
                conversions.setdefault(key, set()).add(version.campaign_id)
                horizons[key] = max(horizons.get(key, timedelta(0)), compiled.horizon)
        global_controls: dict[str, GlobalControl] = {}
        for workspace_id, block in (await store.global_controls(conn)).items():
            try:
                global_controls[workspace_id] = parse_global_control(block)
            except ExperimentError as error:  # dispatch validated it; never stop the projection
                log.error("workspace %s: ignoring its global_control: %s", workspace_id, error)
        self._by_event = by_event
        self._any_event = any_event
        self._exceptions = {key: frozenset(ids) for key, ids in exceptions.items()}
        self._conversions = {key: frozenset(ids) for key, ids in conversions.items()}
        self._horizons = horizons
        self._global_controls = global_controls
        self._generation = generation

    def may_start(self, workspace_id: str, event_name: str) -> bool:
        """Whether some version of some campaign may be started by this event."""
        return bool(
            self._by_event.get((workspace_id, event_name)) or self._any_event.get(workspace_id)
        )

    def for_event(
        self, workspace_id: str, event_name: str, received_at: datetime
    ) -> list[LiveCampaign]:
        """The campaigns this event may start (its trigger event, or a threshold it may change),
        each in the version that was current when the event was received, ordered by campaign
        id. Campaigns created after the event was received are left out."""
        histories = [
            *self._by_event.get((workspace_id, event_name), ()),
            *self._any_event.get(workspace_id, ()),
        ]
        found: list[LiveCampaign] = []
        for history in histories:
            effective = None
            for live in history:
                if live.created_at <= received_at:
                    effective = live
            if effective is None:
                continue
            names = effective.compiled.trigger_event_names
            if names is None or event_name in names:
                found.append(effective)
        found.sort(key=lambda live: live.compiled.definition.id)
        return found

    def cancelled_by(self, workspace_id: str, event_name: str) -> frozenset[str]:
        """Ids of campaigns with an exception rule (in any version) naming this event."""
        return self._exceptions.get((workspace_id, event_name), frozenset())

    @property
    def has_conversions(self) -> bool:
        """Whether any campaign version has a conversion goal (else no event converts)."""
        return bool(self._conversions)

    def converted_by(self, workspace_id: str, event_name: str) -> frozenset[str]:
        """Ids of campaigns whose conversion goal (in any version) is this event."""
        return self._conversions.get((workspace_id, event_name), frozenset())

    def conversion_horizon(self, workspace_id: str, event_name: str) -> timedelta:
        """The longest analysis horizon of the campaigns this event converts."""
        return self._horizons.get((workspace_id, event_name), timedelta(0))

    def global_control(self, workspace_id: str) -> GlobalControl | None:
        """The workspace's global control group (its policy's `global_control`), if any."""
        return self._global_controls.get(workspace_id)

    def compiled(
        self, workspace_id: str, campaign_id: str, version: int
    ) -> CompiledCampaign | None:
        """A version loaded by the last refresh."""
        return self._versions.get((workspace_id, campaign_id, version))

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


@dataclass
class CampaignMember:
    """One user's history with one campaign while a batch (or a fired timer) is decided.

    Loaded from the instances, then kept up to date in memory as decisions are made, so that
    a later event of the same batch sees the instances an earlier one armed, re-armed or
    cancelled.
    """

    last_entered_at: datetime | None = None
    last_sent_at: datetime | None = None
    pending: dict[str, tuple[store.Instance, PendingInstance]] = field(default_factory=dict)

    def membership(self) -> Membership:
        """The pure view that decisions take."""
        return Membership(
            last_entered_at=self.last_entered_at,
            last_sent_at=self.last_sent_at,
            pending=frozenset(self.pending),
            pending_instances={key: pending for key, (_, pending) in self.pending.items()},
        )

    def add_pending(self, instance: store.Instance, trigger: RecordedEvent) -> None:
        """Track a new pending instance."""
        self.pending[instance.correlation] = (
            instance,
            PendingInstance(
                instance_id=UUID(instance.instance_id),
                version=instance.version,
                correlation=instance.correlation,
                trigger=trigger,
                due_at=instance.due_at,
                group=instance.experiment_group,
            ),
        )


MemberKey = tuple[str, str, str]
"""(workspace_id, user_id, campaign_id)"""


async def load_members(
    conn: Queryable,
    keys: Iterable[tuple[str, str]],
    exclude_instance: str | None = None,
    *,
    lock: bool = False,
) -> dict[MemberKey, CampaignMember]:
    """Users' history with campaigns, from their instances, by (workspace, user, campaign).

    With `lock`, their pending instances are locked FOR UPDATE until the transaction ends.
    """
    pairs = list(keys)
    members: dict[MemberKey, CampaignMember] = {}
    for summary in await store.member_summaries(conn, pairs, exclude_instance):
        members[(summary.workspace_id, summary.user_id, summary.campaign_id)] = CampaignMember(
            last_entered_at=summary.last_entered_at, last_sent_at=summary.last_sent_at
        )
    for instance in await store.pending_instances(conn, pairs, exclude_instance, lock=lock):
        key = (instance.workspace_id, instance.user_id, instance.campaign_id)
        member = members.setdefault(key, CampaignMember())
        member.add_pending(instance, _event_from_document(instance.trigger_event))
    return members


@dataclass
class _Effects:
    """What one transaction writes besides states and the checkpoint.

    Timer calls are kept per timer, last one wins, in first-seen order: a user with many
    sessions in one batch re-arms their inactivity timer once, and a timer armed then
    cancelled within the batch is only cancelled.
    """

    decisions: list[store.DecisionRow] = field(default_factory=list)
    instances: list[store.Instance] = field(default_factory=list)
    outbox: list[store.OutboxItem] = field(default_factory=list)
    timers: dict[str, store.OutboxItem] = field(default_factory=dict)
    rearmed: dict[str, store.Rearm] = field(default_factory=dict)
    cancelled_instances: list[str] = field(default_factory=list)
    exposures: list[store.Exposure] = field(default_factory=list)
    suppressed_instances: list[str] = field(default_factory=list)
    conversions: list[store.ConversionRow] = field(default_factory=list)
    events: list[eventstore.NewEvent] = field(default_factory=list)
    entered: dict[tuple[str, str], list[store.Instance]] = field(default_factory=dict)
    """Instances a conversion event of the batch may count for, by user (not written)."""

    @property
    def has_outbox(self) -> bool:
        """Whether the transaction hands work to the outbox worker."""
        return bool(self.outbox or self.timers)

    async def write(self, conn: Conn) -> None:
        await store.insert_instances(conn, self.instances)
        await store.rearm_instances(conn, list(self.rearmed.values()))
        await store.cancel_instances(conn, self.cancelled_instances)
        await store.expose_instances(conn, self.exposures)
        for instance_id in self.suppressed_instances:
            await store.set_instance_state(conn, instance_id, "suppressed")
        await store.insert_conversions(conn, self.conversions)
        await store.insert_decisions(conn, self.decisions)
        await store.insert_outbox(conn, [*self.outbox, *self.timers.values()])
        if self.events:
            await eventstore.append(conn, self.events)


def send_context(
    campaign: CompiledCampaign,
    trigger: RecordedEvent,
    state: UserState,
    now: datetime,
    group: str | None,
) -> dict[str, Any]:
    """The render context of a send (`user`, `event` = `trigger`, `campaign` with `variant`)."""
    event = event_view(trigger)
    definition = campaign.definition
    return {
        "user": cel_view(state, now),
        "event": event,
        "trigger": event,
        "campaign": {
            "id": definition.id,
            "name": definition.name,
            "version": campaign.version,
            "variant": group or "",
        },
    }


def entry_time(campaign: CompiledCampaign, due_at: datetime, group: str | None) -> datetime:
    """When an instance's trigger condition is met: its due time less its group's delay.

    An action or threshold trigger is met when it fires; an after_first trigger `offset` after
    the first event; an inactivity trigger `for` after the last activity (moved by each re-arm).
    The stats' intention-to-treat window starts here, the same moment for every group: from the
    arming event instead, the activity that re-arms a win-back would count as its conversion.
    """
    return due_at - campaign.delay_for(group)


def assigned_event(
    campaign: CompiledCampaign,
    instance: store.Instance,
    global_control: GlobalControl | None,
    assigned_at: datetime,
) -> eventstore.NewEvent:
    """The `$experiment.assigned` event of an entry: enough to recompute the assignment (the
    salt, and the global control that applied) and check it on replay."""
    properties: dict[str, Any] = {
        "campaign_id": instance.campaign_id,
        "version": instance.version,
        "instance_id": instance.instance_id,
        "group": instance.experiment_group,
        "bucket": instance.experiment_bucket,
        "salt": instance.experiment_salt,
    }
    experiment = campaign.definition.experiment
    if experiment is not None:
        properties["control_percent"] = experiment.control_percent
    if global_control is not None:
        properties["global_control"] = global_control.to_dict()
    return eventstore.NewEvent(
        workspace_id=instance.workspace_id,
        event_id=f"assigned:{instance.instance_id}",
        user_id=instance.user_id,
        name=ASSIGNED_EVENT,
        occurred_at=assigned_at,
        properties=properties,
        context={},
        metadata={},
    )


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


DEFAULT_FIRE_MARGIN = timedelta(0)
"""How long after an instance's due time its timer fires (`NUDGE_RULES_FIRE_MARGIN_S`).

The fire-time re-check must see every event *received* before the due time (RELIABILITY.md
P4). The timer's snapshot xmax covers every transaction that had an xid when it fired, and the
handler waits until the projection has applied all of them. `nudge.eventstore.append` takes
its transaction id before stamping `received_at`, so an event received before the due time
always has an xid below that xmax and no margin is needed; a margin remains configurable for
writers that do not follow that order."""


def decision_time(state: UserState) -> datetime:
    """The time a decision about this user's latest event is made at.

    Not the event's own `received_at`: concurrent group commits stamp `received_at` in an order
    that can differ from commit order, so a user's events can reach the projection with times
    going backwards, and a decision could then be judged against a send stamped "later" (a
    second order found not re-eligible after 0 s). The newest time the user's state has seen is
    monotonic per user and, like everything the projection does, the same on replay."""
    return state.newest_received_at


class Planner:
    """Turns triggered decisions into instances, timers and send requests."""

    def __init__(self, names: BusNames, *, fire_margin: timedelta = DEFAULT_FIRE_MARGIN) -> None:
        self._names = names
        self.fire_margin = fire_margin

    def arm(self, instance_id: str, workspace_id: str, due_at: datetime) -> store.OutboxItem:
        """Arm (or re-arm) an instance's timer for its due time plus the fire margin."""
        return self.timer(instance_id, workspace_id, due_at + self.fire_margin)

    @staticmethod
    def cancel(instance_id: str) -> store.OutboxItem:
        """The scheduler call cancelling an instance's timer."""
        request = scheduler_pb2.CancelRequest(timer_id=instance_id)
        return store.OutboxItem("cancel", f"cancel:{instance_id}", request.SerializeToString())

    def send_request(
        self,
        campaign: CompiledCampaign,
        decision: Decision,
        trigger: RecordedEvent,
        state: UserState,
        now: datetime,
        group: str | None = None,
    ) -> store.OutboxItem:
        """The dispatch work item for a `send_planned` decision; `group` is the instance's
        experiment group (its variant's messages are sent)."""
        assert decision.branch is not None
        assert decision.send_id is not None
        branch = decision.branch
        send_id = str(decision.send_id)
        definition = campaign.definition
        group = group or ""
        message = campaign.messages_for(group)[branch].message
        template = {
            key: (json.dumps(value) if key == "payload" else str(value))
            for key, value in message.to_dict().items()
            if key != "channel" and value is not None
        }
        context = send_context(campaign, trigger, state, now, group)
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
            experiment_group=group,
        )
        return store.OutboxItem(
            kind="dispatch",
            msg_id=send_id,
            subject=self._names.dispatch_subject(trigger.workspace_id, message.channel),
            payload=request.SerializeToString(),
            traceparent=telemetry.current_traceparent(),
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
        return store.OutboxItem(
            "schedule",
            f"schedule:{instance_id}",
            request.SerializeToString(),
            traceparent=telemetry.current_traceparent(),
        )


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
        self._traceparents: dict[int, str | None] = {}
        self.applied_events = 0

    async def apply_once(self) -> int:
        """Apply the next batch; return how many events it had."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Replicas take turns under an advisory lock. Unlike a row lock it assigns no
            # transaction id, and every gap-free reader (the relay too) waits behind the oldest
            # open xid: the batch should hold one only from its first write to its commit.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"reader:{READER}")
            cursor = await eventstore.load_checkpoint(conn, READER)
            result = await eventstore.read_batch(conn, cursor, self._batch_size)
            if not result.events:
                await eventstore.save_checkpoint(conn, READER, cursor, result.xmin)
                return 0
            # Traced as one batch linked to each event's trace; a campaign evaluation continues
            # the trace of the event that triggered it, and so do the sends it plans.
            self._traceparents = {
                e.global_position: e.metadata.get("traceparent") for e in result.events
            }
            with telemetry.batch_span(
                "project events",
                map(telemetry.span_context_of, self._traceparents.values()),
                attributes={"nudge.events": len(result.events)},
            ):
                await self._cache.refresh(conn)
                effects = await self._apply(conn, [recorded(e) for e in result.events])
                await effects.write(conn)
                await eventstore.save_checkpoint(
                    conn, READER, result.events[-1].cursor, self._watermark(result)
                )
        self.applied_events += len(result.events)
        metrics.count_projection(len(result.events), (d.kind for d in effects.decisions))
        if effects.has_outbox and self._on_effects is not None:
            self._on_effects.set()
        return len(result.events)

    def _watermark(self, result: eventstore.ReadResult) -> int:
        """The xid below which every transaction is applied once this batch commits.

        A batch that stopped short of the snapshot (it was full) has applied every transaction
        below its last event's, not every one below the snapshot xmin; recording the xmin then
        would let a fired timer's re-check run before events it must see (T-U9).
        """
        if len(result.events) < self._batch_size:
            return result.xmin
        return result.events[-1].tx_id

    async def _apply(self, conn: Conn, events: Sequence[RecordedEvent]) -> _Effects:
        keys = {(e.workspace_id, e.user_id) for e in events}
        documents = await store.load_states(conn, keys)
        states: dict[tuple[str, str], UserState] = {
            key: state_from_dict(doc) for key, doc in documents.items()
        }
        involved = {
            (e.workspace_id, e.user_id)
            for e in events
            if self._cache.may_start(e.workspace_id, e.name)
            or self._cache.cancelled_by(e.workspace_id, e.name)
        }
        members = await load_members(conn, involved, lock=True) if involved else {}
        effects = _Effects()
        effects.entered = await self._conversion_candidates(conn, events)
        positions: dict[tuple[str, str], int] = {}
        for event in events:
            key = (event.workspace_id, event.user_id)
            before = states.get(key)
            state = evolve(before, event)
            states[key] = state
            positions[key] = event.global_position
            campaigns = self._cache.for_event(event.workspace_id, event.name, event.received_at)
            cancelling = self._cache.cancelled_by(event.workspace_id, event.name)
            if campaigns or cancelling:
                with telemetry.continued_span(
                    "evaluate campaigns",
                    self._traceparents.get(event.global_position),
                    attributes={
                        "nudge.campaigns": len(campaigns),
                        WORKSPACE_ATTRIBUTE: event.workspace_id,
                    },
                ):
                    self._cancel(event, state, cancelling, members, effects)
                    self._evaluate(event, before, state, campaigns, members, effects)
            if effects.entered:
                converting = self._cache.converted_by(event.workspace_id, event.name)
                if converting:
                    self._convert(event, state, converting, effects)
        await store.save_states(
            conn,
            [(w, u, state_to_dict(states[(w, u)]), positions[(w, u)]) for w, u in positions],
        )
        return effects

    async def _conversion_candidates(
        self, conn: Conn, events: Sequence[RecordedEvent]
    ) -> dict[tuple[str, str], list[store.Instance]]:
        """The instances that this batch's conversion events may count for, by user: entered
        within the longest analysis horizon before the batch's earliest event."""
        keys: set[tuple[str, str]] = set()
        campaign_ids: set[str] = set()
        since: datetime | None = None
        if not self._cache.has_conversions:
            return {}
        for event in events:
            converting = self._cache.converted_by(event.workspace_id, event.name)
            if not converting:
                continue
            keys.add((event.workspace_id, event.user_id))
            campaign_ids |= converting
            start = event.received_at - self._cache.conversion_horizon(
                event.workspace_id, event.name
            )
            since = start if since is None else min(since, start)
        found: dict[tuple[str, str], list[store.Instance]] = {}
        if since is None:
            return found
        # Decision times never run earlier than received_at (they are per-user maxima), so the
        # earliest received_at bounds every window from below.
        for instance in await store.conversion_instances(
            conn, keys, sorted(campaign_ids), since - timedelta(seconds=1)
        ):
            found.setdefault((instance.workspace_id, instance.user_id), []).append(instance)
        return found

    def _convert(
        self,
        event: RecordedEvent,
        state: UserState,
        campaign_ids: frozenset[str],
        effects: _Effects,
    ) -> None:
        """Count `event` as a conversion of each instance of these campaigns whose analysis
        horizon holds it and whose `conversion.match` is true (the stats take the first)."""
        now = decision_time(state)
        for instance in effects.entered.get((event.workspace_id, event.user_id), ()):
            if instance.campaign_id not in campaign_ids or instance.entered_at is None:
                continue
            if instance.trigger_event_id == event.event_id:
                continue  # the event that started the instance does not convert it
            campaign = self._cache.compiled(
                event.workspace_id, instance.campaign_id, instance.version
            )
            if campaign is None or campaign.horizon is None:
                continue
            conversion = campaign.definition.conversion
            if conversion is None or conversion.event != event.name:
                continue
            if not instance.entered_at <= now < instance.entered_at + campaign.horizon:
                continue
            trigger = _event_from_document(instance.trigger_event)
            matched = conversion_matches(campaign, event, trigger, state, now)
            if isinstance(matched, str):
                log.warning(
                    "conversion.match of %s failed for %s: %s",
                    instance.campaign_id,
                    event.event_id,
                    matched,
                )
            if matched is not True:
                continue
            effects.conversions.append(
                store.ConversionRow(
                    instance_id=instance.instance_id,
                    event_id=event.event_id,
                    workspace_id=event.workspace_id,
                    campaign_id=instance.campaign_id,
                    user_id=event.user_id,
                    converted_at=now,
                )
            )

    def _cancel(
        self,
        event: RecordedEvent,
        state: UserState,
        campaign_ids: Iterable[str],
        members: dict[MemberKey, CampaignMember],
        effects: _Effects,
    ) -> None:
        """Cancel the pending instances this event is an exception for, at once."""
        for campaign_id in sorted(campaign_ids):
            member = members.get((event.workspace_id, event.user_id, campaign_id))
            if member is None or not member.pending:
                continue
            for correlation, (instance, pending) in sorted(member.pending.items()):
                campaign = self._cache.compiled(event.workspace_id, campaign_id, instance.version)
                if campaign is None:
                    continue
                decision = decide_exception(campaign, event, pending, state, decision_time(state))
                if decision is None:
                    continue
                effects.decisions.append(_decision_row(decision))
                if decision.kind is DecisionKind.CANCELLED:
                    self._cancel_instance(instance.instance_id, effects)
                    del member.pending[correlation]

    def _cancel_instance(self, instance_id: str, effects: _Effects) -> None:
        effects.cancelled_instances.append(instance_id)
        effects.rearmed.pop(instance_id, None)
        effects.timers[instance_id] = self._planner.cancel(instance_id)

    def _evaluate(
        self,
        event: RecordedEvent,
        before: UserState | None,
        state: UserState,
        campaigns: Sequence[LiveCampaign],
        members: dict[MemberKey, CampaignMember],
        effects: _Effects,
    ) -> None:
        if not campaigns:
            return
        now = decision_time(state)
        context = EvaluationContext.for_campaigns(
            event, state, now, [live.compiled for live in campaigns]
        )
        for live in campaigns:
            campaign = live.compiled
            campaign_id = campaign.definition.id
            member = members.setdefault(
                (event.workspace_id, event.user_id, campaign_id), CampaignMember()
            )
            for decision in decide_on_event(
                campaign,
                event,
                state,
                member.membership(),
                now,
                context=context,
                paused=live.status == "paused",
                state_before=before,
                global_control=self._cache.global_control(event.workspace_id),
            ):
                effects.decisions.append(_decision_row(decision))
                if decision.kind is DecisionKind.TRIGGERED:
                    self._enter(campaign, decision, event, state, member, effects)
                elif decision.kind is DecisionKind.REARMED:
                    self._rearm(decision, event, member, effects)
                elif decision.kind is DecisionKind.CANCELLED:
                    assert decision.instance_id is not None
                    self._cancel_instance(str(decision.instance_id), effects)
                    member.pending.pop(decision.correlation, None)

    def _enter(
        self,
        campaign: CompiledCampaign,
        decision: Decision,
        event: RecordedEvent,
        state: UserState,
        member: CampaignMember,
        effects: _Effects,
    ) -> None:
        assert decision.instance_id is not None
        assert decision.due_at is not None
        group = str(decision.detail["group"])
        instance = store.Instance(
            instance_id=str(decision.instance_id),
            workspace_id=event.workspace_id,
            campaign_id=campaign.definition.id,
            version=campaign.version,
            user_id=event.user_id,
            correlation=decision.correlation,
            trigger_event_id=event.event_id,
            trigger_event=_event_document(event),
            state="pending",
            due_at=decision.due_at,
            experiment_group=group,
            experiment_bucket=float(decision.detail["bucket"]),
            experiment_salt=str(decision.detail["salt"]),
            entered_at=entry_time(campaign, decision.due_at, group),
        )
        if campaign.definition.conversion is not None:
            effects.entered.setdefault((event.workspace_id, event.user_id), []).append(instance)
        global_control = applicable_global_control(
            campaign.definition.kind, self._cache.global_control(event.workspace_id)
        )
        if campaign.definition.experiment is not None or group == GLOBAL_CONTROL:
            effects.events.append(
                assigned_event(campaign, instance, global_control, decision.decided_at)
            )
        if decision.delayed_until is None:
            self._send_now(campaign, event, state, member, instance, effects)
            return
        effects.instances.append(instance)
        effects.timers[instance.instance_id] = self._planner.arm(
            instance.instance_id, event.workspace_id, decision.due_at
        )
        member.add_pending(instance, event)

    def _rearm(
        self,
        decision: Decision,
        event: RecordedEvent,
        member: CampaignMember,
        effects: _Effects,
    ) -> None:
        assert decision.instance_id is not None
        assert decision.due_at is not None
        instance, _ = member.pending[decision.correlation]
        version = self._cache.compiled(event.workspace_id, instance.campaign_id, instance.version)
        moved = replace(
            instance,
            due_at=decision.due_at,
            trigger_event_id=event.event_id,
            trigger_event=_event_document(event),
            entered_at=(
                instance.entered_at
                if version is None
                else entry_time(version, decision.due_at, instance.experiment_group)
            ),
        )
        effects.rearmed[moved.instance_id] = store.Rearm(
            moved.instance_id,
            moved.due_at,
            moved.trigger_event_id,
            moved.trigger_event,
            moved.entered_at,
        )
        effects.timers[moved.instance_id] = self._planner.arm(
            moved.instance_id, event.workspace_id, decision.due_at
        )
        member.add_pending(moved, event)

    def _send_now(
        self,
        campaign: CompiledCampaign,
        event: RecordedEvent,
        state: UserState,
        member: CampaignMember,
        instance: store.Instance,
        effects: _Effects,
    ) -> None:
        now = decision_time(state)
        decision = decide_at_fire(
            campaign,
            event,
            state,
            member.membership(),
            now,
            instance=UUID(instance.instance_id),
            group=instance.experiment_group,
        )
        effects.decisions.append(_decision_row(decision))
        if decision.kind in (DecisionKind.SEND_PLANNED, DecisionKind.HELD_OUT):
            assert decision.send_id is not None
            state_name = "sent" if decision.kind is DecisionKind.SEND_PLANNED else "held_out"
            effects.instances.append(
                replace(instance, state=state_name, exposed_at=now, send_id=str(decision.send_id))
            )
            if decision.kind is DecisionKind.SEND_PLANNED:
                effects.outbox.append(
                    self._planner.send_request(
                        campaign, decision, event, state, now, instance.experiment_group
                    )
                )
            member.last_sent_at = now
            return
        effects.instances.append(replace(instance, state="suppressed"))


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
            # The fire re-check reads only when the user last received the campaign: the
            # summaries, not the user's pending instances.
            membership = Membership()
            for summary in await store.member_summaries(
                conn, [(instance.workspace_id, instance.user_id)], instance.instance_id
            ):
                if summary.campaign_id == instance.campaign_id:
                    membership = Membership(
                        last_entered_at=summary.last_entered_at,
                        last_sent_at=summary.last_sent_at,
                    )
            decision = decide_at_fire(
                campaign,
                trigger,
                state,
                membership,
                now,
                instance=UUID(instance.instance_id),
                paused=status == "paused",
                group=instance.experiment_group,
            )
            effects = _Effects(decisions=[_decision_row(decision)])
            if decision.kind in (DecisionKind.SEND_PLANNED, DecisionKind.HELD_OUT):
                assert decision.send_id is not None
                sent = decision.kind is DecisionKind.SEND_PLANNED
                effects.exposures.append(
                    store.Exposure(
                        instance.instance_id,
                        "sent" if sent else "held_out",
                        now,
                        str(decision.send_id),
                    )
                )
                if sent:
                    effects.outbox.append(
                        self._planner.send_request(
                            campaign, decision, trigger, state, now, instance.experiment_group
                        )
                    )
            elif decision.kind not in (DecisionKind.PAUSED, DecisionKind.STILL_ACTIVE):
                effects.suppressed_instances.append(instance.instance_id)
            await effects.write(conn)
        if effects.outbox and self._on_effects is not None:
            self._on_effects.set()


RESUME_LOOKAHEAD = timedelta(minutes=1)


class CampaignAdmin:
    """Validates and stores campaign definitions; pauses and resumes campaigns.

    Pausing stops new instances and sends; a paused campaign's pending instances stay pending
    when their timers fire. Resuming re-arms the timers of those that came due meanwhile, so
    they are re-checked (and sent) at once; the others keep their timers and due times.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        fire_margin: timedelta = DEFAULT_FIRE_MARGIN,
        on_effects: asyncio.Event | None = None,
    ) -> None:
        self._pool = pool
        self._fire_margin = fire_margin
        self._on_effects = on_effects

    async def apply(
        self, workspace_id: str, document: Mapping[str, Any]
    ) -> tuple[store.CampaignVersion, bool]:
        """Store `document` as the next version of its campaign if it changed (its `status`
        pauses or resumes the campaign without a new version)."""
        definition = validate_campaign(document)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))",
                workspace_id,
                definition.id,
            )
            before = await store.current_campaign(conn, workspace_id, definition.id)
            saved = await store.save_campaign_version(
                conn,
                workspace_id,
                definition.id,
                definition.to_dict(),
                definition.definition_hash(),
                definition.status,
            )
            rearmed = 0
            if before is not None and before.status == "paused" and definition.status == "active":
                rearmed = await self._rearm_overdue(conn, workspace_id, definition.id)
        self._wake_outbox(rearmed)
        return saved

    async def set_status(
        self, workspace_id: str, campaign_id: str, status: str
    ) -> store.CampaignVersion:
        """Pause (`paused`) or resume (`active`) a campaign; NotFoundError when unknown."""
        async with self._pool.acquire() as conn, conn.transaction():
            found = await store.set_campaign_status(conn, workspace_id, campaign_id, status)
            if found is None:
                raise NotFoundError(f"no campaign {campaign_id!r}")
            current, before = found
            rearmed = 0
            if before == "paused" and status == "active":
                rearmed = await self._rearm_overdue(conn, workspace_id, campaign_id)
        self._wake_outbox(rearmed)
        return current

    def _wake_outbox(self, items: int) -> None:
        if items and self._on_effects is not None:
            self._on_effects.set()

    async def _rearm_overdue(self, conn: Conn, workspace_id: str, campaign_id: str) -> int:
        """Re-arm the timers of pending instances that came due while the campaign was paused
        (their timer fired and left them pending); return how many."""
        now = await db_now(conn)
        effects = _Effects()
        # Also the timers about to fire: one that fires while this transaction is open would be
        # handled as paused (the resume is not committed yet) and wait forever. Re-arming a timer
        # that has not fired, with the same due time, is a no-op in the scheduler.
        overdue = await store.overdue_pending_instances(
            conn, workspace_id, campaign_id, self._fire_margin, RESUME_LOOKAHEAD
        )
        for instance in overdue:
            effects.timers[instance.instance_id] = Planner.timer(
                instance.instance_id, workspace_id, instance.due_at + self._fire_margin
            )
            effects.decisions.append(
                store.DecisionRow(
                    workspace_id=workspace_id,
                    user_id=instance.user_id,
                    campaign_id=campaign_id,
                    version=instance.version,
                    instance_id=instance.instance_id,
                    event_id=instance.trigger_event_id,
                    kind=str(DecisionKind.RESUMED),
                    reason="campaign resumed; the instance came due while paused and is "
                    "re-checked now",
                    detail={"due_at": instance.due_at.isoformat()},
                    decided_at=now,
                )
            )
        await effects.write(conn)
        return len(overdue)


def validate_campaign(document: Mapping[str, Any]) -> CampaignDefinition:
    """Parse and compile a definition (CEL and templates); errors name the field."""
    from services.dispatch.templating import RenderError, validate_template

    try:
        definition = parse_campaign(document)
        compile_campaign(definition)
        fields: list[tuple[str, Any]] = [
            (f"messages[{index}].message.{name}", template)
            for index, branch in enumerate(definition.messages)
            for name, template in branch.message.to_dict().items()
        ]
        if definition.experiment is not None:
            fields.extend(
                (f"experiment.variants[{index}].message.{name}", template)
                for index, variant in enumerate(definition.experiment.variants)
                for name, template in (variant.message or {}).items()
            )
        for path, template in fields:
            if path.endswith(".channel") or template is None:
                continue
            for text in _strings(template):
                try:
                    validate_template(text)
                except RenderError as error:
                    raise CampaignError(path, str(error)) from None
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
