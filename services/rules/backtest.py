"""Backtest: replay a period of stored events through a campaign definition, send nothing.

`nudge backtest FILE.yaml --from DATE --to DATE` (RulesService.Backtest; docs/experiments.md
§7). Two parts:

- **The simulator** (`simulate_user`, `build_report`) is pure: a user's events in, what the
  campaign would have done out. It reuses the live code — `evaluation.decide_on_event`,
  `decide_exception` and `decide_at_fire`, `domain.evolve`, `application.decision_time`, and
  dispatch's `policy.decide_claims` with in-memory cap reservations — and keeps the same
  in-memory bookkeeping as the live `Projector` (`CampaignMember`). Consent at claim time comes
  from `services.dispatch.recipient_twin`, the Python twin of the SQL trigger that live dispatch
  reads.
- **The shell** (`run_backtest`) validates the definition and reads what the simulator needs in
  ONE `REPEATABLE READ, READ ONLY` transaction (the pattern of `replay.verify_projection`): it
  cannot write, so live state is never touched.

The rules the simulator follows (each the live one):

- The definition is treated as created at `from`: events received before `from` only build the
  user's state (and consent facts); events received in `[from, to)` are evaluated. The campaign
  starts with no history (nobody has received it, nothing is pending).
- Every user is independent (state, membership, consent, caps are per user), so users are
  simulated one at a time; the report is the same whatever order they come in.
- A user's events in the period are taken in `(received_at, tx_id, global_position)` order and
  merged with a heap of pending timers. A timer due at `t` fires after every event received at
  or before `t` (the live fire sees every event stored before it) and at exactly `t` (no fire
  margin). Timers due at or after `to` do not fire: those instances are reported as pending.
- Decisions are made at `application.decision_time(state)`; a delay-0 entry is decided at fire
  at once (the live `_send_now`); `send_planned` and `held_out` both count as a send for
  re-eligibility.
- Each would-be send is claimed at its decision time like dispatch would: consent facts as of
  that moment, quiet hours (a held send is claimed again when the window ends), frequency caps
  counting the cap slots the user's live sends of *other* campaigns held, plus the slots the
  simulated sends take. A send to an address a provider reported undeliverable is suppressed
  (the address is rendered only when the user has such an address on that channel).

What it does not model: the workspace policy's history (the current policy applies to the
whole period), a campaign paused part of the time (the definition is simulated as active),
retries and provider failures (a claimed send counts as sent).
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import asyncpg

from nudge.db import Conn
from nudge.grpcserver import InvalidArgumentError
from nudge.protoconv import dict_to_struct, struct_to_dict
from services.dispatch.policy import (
    Contender,
    PolicyError,
    Reservation,
    Verdict,
    WorkspacePolicy,
    decide_claims,
    parse_policy,
    undeliverable_refusal,
    user_zone,
)
from services.dispatch.recipient_twin import FAILED, IDENTIFY, RecipientFacts, project_recipient
from services.dispatch.templating import RenderError, render_field, single_line
from services.rules import store
from services.rules.application import decision_time, entry_time, send_context, validate_campaign
from services.rules.cel import CompiledCampaign, compile_campaign
from services.rules.domain import (
    Decision,
    DecisionKind,
    Membership,
    PendingInstance,
    RecordedEvent,
    UserState,
    evolve,
)
from services.rules.evaluation import decide_at_fire, decide_exception, decide_on_event
from services.rules.experiments import (
    DEFAULT_VARIANT,
    ExperimentError,
    GlobalControl,
    parse_global_control,
)

log = logging.getLogger("nudge.rules.backtest")

MAX_RANGE: Final = timedelta(days=366)
"""The longest period one backtest may cover."""
CAP_LOOKBACK: Final = timedelta(days=372)
"""How far before `from` live cap slots are read (the longest cap window: 53 weeks, 366 days)."""
BACKTEST_STATEMENT_TIMEOUT: Final = "10min"
BACKTEST_VERSION: Final = 0
"""The version number the backtested definition is compiled with (ids differ from live)."""

SENT: Final = "sent"
SUPPRESSED: Final = "suppressed"
HELD_OUT: Final = "held_out"
RENDER_FAILED: Final = "render_failed"


# --------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class SimulatedDecision:
    """One decision the campaign would have made (the fields that do not depend on the
    version number: compare with live `decisions` rows on these)."""

    user_id: str
    kind: str
    event_id: str
    decided_at: datetime
    correlation: str = ""
    due_at: datetime | None = None
    branch: int | None = None
    group: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "kind": self.kind,
            "event_id": self.event_id,
            "decided_at": self.decided_at.isoformat(),
            "correlation": self.correlation,
            "due_at": _iso(self.due_at),
            "branch": self.branch,
            "group": self.group,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Entry:
    """A user who would have entered the campaign (one per instance)."""

    user_id: str
    event_id: str
    entered_at: datetime
    group: str
    due_at: datetime
    correlation: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "event_id": self.event_id,
            "entered_at": self.entered_at.isoformat(),
            "group": self.group,
            "due_at": self.due_at.isoformat(),
            "correlation": self.correlation,
        }


@dataclass(frozen=True)
class WouldBeSend:
    """A message the campaign would have sent (or, for a held-out group, not sent).

    `due_at` is the send decision's time; `claimed_at` when dispatch would have claimed it
    (later than `due_at` after a quiet-hours hold, None when suppressed or held out);
    `held_until` the end of the quiet hours it was held for. `outcome`: `sent`, `suppressed`
    (`code`: unsubscribed, not_opted_in, frequency_cap, undeliverable), `held_out` (control
    groups: nothing sent) or `render_failed` (the address could not be rendered).
    """

    user_id: str
    trigger_event_id: str
    group: str
    branch: int
    channel: str
    due_at: datetime
    outcome: str
    claimed_at: datetime | None = None
    held_until: datetime | None = None
    code: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "trigger_event_id": self.trigger_event_id,
            "group": self.group,
            "branch": self.branch,
            "channel": self.channel,
            "due_at": self.due_at.isoformat(),
            "claimed_at": _iso(self.claimed_at),
            "held_until": _iso(self.held_until),
            "outcome": self.outcome,
            "code": self.code,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class UserRun:
    """What the campaign would have done for one user."""

    user_id: str
    events: int
    decisions: tuple[SimulatedDecision, ...]
    entries: tuple[Entry, ...]
    sends: tuple[WouldBeSend, ...]
    cancelled_by_exception: int
    pending_at_end: int


@dataclass(frozen=True)
class BacktestReport:
    """The outcome of a backtest; every collection in a stable order (JSON: `to_dict`).

    `entered` maps each group to the users who entered it (sorted); `suppressed` counts the
    suppressed sends by code, `frequency_caps` the cap suppressions by rule; `quiet_hours_holds`
    is how many sends quiet hours held (and released later)."""

    campaign_id: str
    start: datetime
    end: datetime
    users: int
    events: int
    entered: Mapping[str, tuple[str, ...]]
    entries: tuple[Entry, ...]
    sends: tuple[WouldBeSend, ...]
    cancelled_by_exception: int
    pending_at_end: int
    decision_counts: Mapping[str, int]
    outcomes: Mapping[str, int]
    suppressed: Mapping[str, int]
    frequency_caps: Mapping[str, int]
    quiet_hours_holds: int
    decisions: tuple[SimulatedDecision, ...] = field(default=(), repr=False)

    def to_dict(self, *, with_decisions: bool = False) -> dict[str, Any]:
        """Plain JSON data (sorted keys where the order is not already meaningful)."""
        out: dict[str, Any] = {
            "campaign_id": self.campaign_id,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "users": self.users,
            "events": self.events,
            "entered": {group: list(users) for group, users in self.entered.items()},
            "entries": [entry.to_dict() for entry in self.entries],
            "sends": [send.to_dict() for send in self.sends],
            "cancelled_by_exception": self.cancelled_by_exception,
            "pending_at_end": self.pending_at_end,
            "decision_counts": dict(self.decision_counts),
            "outcomes": dict(self.outcomes),
            "suppressed": dict(self.suppressed),
            "frequency_caps": dict(self.frequency_caps),
            "quiet_hours_holds": self.quiet_hours_holds,
        }
        if with_decisions:
            out["decisions"] = [decision.to_dict() for decision in self.decisions]
        return out


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _sorted_counts(counter: Counter[str]) -> dict[str, int]:
    return {key: counter[key] for key in sorted(counter)}


def build_report(
    campaign: CompiledCampaign, start: datetime, end: datetime, runs: Iterable[UserRun]
) -> BacktestReport:
    """Aggregate the users' runs (in any order) into the report."""
    ordered = sorted(runs, key=lambda run: run.user_id)
    entries = sorted(
        (entry for run in ordered for entry in run.entries),
        key=lambda e: (e.entered_at, e.user_id, e.event_id, e.correlation),
    )
    sends = sorted(
        (send for run in ordered for send in run.sends),
        key=lambda s: (s.due_at, s.user_id, s.trigger_event_id, s.branch),
    )
    decisions = tuple(
        sorted(
            (d for run in ordered for d in run.decisions),
            key=lambda d: (d.user_id, d.decided_at),
        )
    )
    entered: dict[str, set[str]] = {}
    for entry in entries:
        entered.setdefault(entry.group, set()).add(entry.user_id)
    outcomes: Counter[str] = Counter(send.outcome for send in sends)
    suppressed: Counter[str] = Counter(s.code for s in sends if s.outcome == SUPPRESSED)
    caps: Counter[str] = Counter(
        s.reason for s in sends if s.outcome == SUPPRESSED and s.code == "frequency_cap"
    )
    return BacktestReport(
        campaign_id=campaign.definition.id,
        start=start,
        end=end,
        users=len(ordered),
        events=sum(run.events for run in ordered),
        entered={group: tuple(sorted(users)) for group, users in sorted(entered.items())},
        entries=tuple(entries),
        sends=tuple(sends),
        cancelled_by_exception=sum(run.cancelled_by_exception for run in ordered),
        pending_at_end=sum(run.pending_at_end for run in ordered),
        decision_counts=_sorted_counts(Counter(d.kind for d in decisions)),
        outcomes=_sorted_counts(outcomes),
        suppressed=_sorted_counts(suppressed),
        frequency_caps=_sorted_counts(caps),
        quiet_hours_holds=sum(1 for s in sends if s.held_until is not None),
        decisions=decisions,
    )


# --------------------------------------------------------------------------------------------
# The simulator (pure)


@dataclass
class _Member:
    """The user's history with the campaign, kept in memory as the live `CampaignMember` is:
    a later event or timer sees the instances an earlier one armed, re-armed or cancelled."""

    last_entered_at: datetime | None = None
    last_sent_at: datetime | None = None
    pending: dict[str, PendingInstance] = field(default_factory=dict)

    def membership(self, exclude: str | None = None) -> Membership:
        """The pure view decisions take (`exclude`: a correlation left out, as the timer
        handler leaves out the instance it re-checks)."""
        pending = {key: value for key, value in self.pending.items() if key != exclude}
        return Membership(
            last_entered_at=self.last_entered_at,
            last_sent_at=self.last_sent_at,
            pending=frozenset(pending),
            pending_instances=pending,
        )


@dataclass(frozen=True)
class _Planned:
    """A send the campaign planned, waiting for its simulated claim."""

    decision: Decision
    group: str
    channel: str
    address: str | None
    render_error: str | None


def _group_of(decision: Decision) -> str:
    group = decision.detail.get("group") if decision.detail else None
    return group if isinstance(group, str) and group else DEFAULT_VARIANT


def _simulated(decision: Decision, group: str | None = None) -> SimulatedDecision:
    return SimulatedDecision(
        user_id=decision.user_id,
        kind=str(decision.kind),
        event_id=decision.event_id,
        decided_at=decision.decided_at,
        correlation=decision.correlation,
        due_at=decision.due_at,
        branch=decision.branch,
        group=group,
        reason=decision.reason,
    )


class _UserSimulation:
    """One user's period, event by event and timer by timer (see the module docstring)."""

    def __init__(
        self,
        campaign: CompiledCampaign,
        global_control: GlobalControl | None,
        render_addresses: bool,
    ) -> None:
        self.campaign = campaign
        self.global_control = global_control
        self.render_addresses = render_addresses
        self.exception_names = frozenset(rule.event for rule in campaign.definition.exceptions)
        self.state: UserState | None = None
        self.member = _Member()
        self.timers: list[tuple[datetime, int, str]] = []
        self.due: dict[str, tuple[datetime, int]] = {}
        self.sequence = 0
        self.decisions: list[SimulatedDecision] = []
        self.entries: list[Entry] = []
        self.planned: list[_Planned] = []
        self.cancelled = 0

    # -- timers (a re-arm replaces the instance's timer, as the scheduler does)

    def arm(self, correlation: str, due_at: datetime) -> None:
        self.sequence += 1
        self.due[correlation] = (due_at, self.sequence)
        heapq.heappush(self.timers, (due_at, self.sequence, correlation))

    def disarm(self, correlation: str) -> None:
        self.due.pop(correlation, None)

    def fire_until(self, limit: datetime) -> None:
        """Fire every timer due strictly before `limit`, in due order."""
        while self.timers and self.timers[0][0] < limit:
            due_at, sequence, correlation = heapq.heappop(self.timers)
            if self.due.get(correlation) != (due_at, sequence):
                continue  # re-armed or cancelled since
            del self.due[correlation]
            self.fire(correlation, due_at)

    # -- events (Projector._apply, for one campaign)

    def apply(self, event: RecordedEvent) -> None:
        before = self.state
        state = self.state = evolve(before, event)
        campaign = self.campaign
        if event.name in self.exception_names:
            self.cancel(event, state)
        names = campaign.trigger_event_names
        if names is not None and event.name not in names:
            return
        now = decision_time(state)
        for decision in decide_on_event(
            campaign,
            event,
            state,
            self.member.membership(),
            now,
            paused=False,
            state_before=before,
            global_control=self.global_control,
        ):
            if decision.kind is DecisionKind.TRIGGERED:
                self.enter(decision, event, state)
            elif decision.kind is DecisionKind.REARMED:
                self.decisions.append(_simulated(decision))
                pending = self.member.pending[decision.correlation]
                assert decision.due_at is not None
                self.member.pending[decision.correlation] = PendingInstance(
                    instance_id=pending.instance_id,
                    version=pending.version,
                    correlation=pending.correlation,
                    trigger=event,
                    due_at=decision.due_at,
                    group=pending.group,
                )
                self.arm(decision.correlation, decision.due_at)
            else:
                self.decisions.append(_simulated(decision))
                if decision.kind is DecisionKind.CANCELLED:
                    self.member.pending.pop(decision.correlation, None)
                    self.disarm(decision.correlation)

    def cancel(self, event: RecordedEvent, state: UserState) -> None:
        for correlation, pending in sorted(self.member.pending.items()):
            decision = decide_exception(self.campaign, event, pending, state, decision_time(state))
            if decision is None:
                continue
            self.decisions.append(_simulated(decision, pending.group))
            if decision.kind is DecisionKind.CANCELLED:
                self.cancelled += 1
                del self.member.pending[correlation]
                self.disarm(correlation)

    def enter(self, decision: Decision, event: RecordedEvent, state: UserState) -> None:
        assert decision.instance_id is not None
        assert decision.due_at is not None
        group = _group_of(decision)
        self.decisions.append(_simulated(decision, group))
        self.entries.append(
            Entry(
                user_id=event.user_id,
                event_id=event.event_id,
                entered_at=entry_time(self.campaign, decision.due_at, group),
                group=group,
                due_at=decision.due_at,
                correlation=decision.correlation,
            )
        )
        self.member.last_entered_at = decision.decided_at
        pending = PendingInstance(
            instance_id=decision.instance_id,
            version=self.campaign.version,
            correlation=decision.correlation,
            trigger=event,
            due_at=decision.due_at,
            group=group,
        )
        if decision.delayed_until is None:  # Projector._send_now
            self.decide_send(pending, state, decision_time(state), self.member.membership())
            return
        self.member.pending[decision.correlation] = pending
        self.arm(decision.correlation, decision.due_at)

    # -- timers firing (TimerHandler.handle)

    def fire(self, correlation: str, now: datetime) -> None:
        pending = self.member.pending[correlation]
        assert self.state is not None
        keep = self.decide_send(pending, self.state, now, self.member.membership(correlation))
        if not keep:
            del self.member.pending[correlation]

    def decide_send(
        self, pending: PendingInstance, state: UserState, now: datetime, membership: Membership
    ) -> bool:
        """Re-check at fire; plan the send. True when the instance stays pending."""
        decision = decide_at_fire(
            self.campaign,
            pending.trigger,
            state,
            membership,
            now,
            instance=pending.instance_id,
            paused=False,
            group=pending.group,
        )
        group = pending.group or DEFAULT_VARIANT
        self.decisions.append(_simulated(decision, group))
        if decision.kind in (DecisionKind.SEND_PLANNED, DecisionKind.HELD_OUT):
            self.member.last_sent_at = now
            self.planned.append(self.plan(decision, pending, state, now, group))
            return False
        return decision.kind in (DecisionKind.PAUSED, DecisionKind.STILL_ACTIVE)

    def plan(
        self,
        decision: Decision,
        pending: PendingInstance,
        state: UserState,
        now: datetime,
        group: str,
    ) -> _Planned:
        assert decision.branch is not None
        message = self.campaign.messages_for(pending.group)[decision.branch].message
        address: str | None = None
        error: str | None = None
        template = message.to_dict().get("to")
        if self.render_addresses and isinstance(template, str):
            try:
                address = render_address(
                    self.campaign, template, pending.trigger, state, now, pending.group
                )
            except RenderError as failure:
                error = f"render failed: {failure}"
        return _Planned(decision, group, message.channel, address, error)


def render_address(
    campaign: CompiledCampaign,
    template: str,
    trigger: RecordedEvent,
    state: UserState,
    now: datetime,
    group: str | None = None,
) -> str:
    """The `to` field as dispatch renders it (the live send's context, with the same protobuf
    round trip as a live send request, so numbers are doubles there too)."""
    context = struct_to_dict(dict_to_struct(send_context(campaign, trigger, state, now, group)))
    return single_line(render_field("to", template, context))


def _claims(
    campaign: CompiledCampaign,
    planned: Sequence[_Planned],
    consent_events: Sequence[RecordedEvent],
    policy: WorkspacePolicy,
    live_reservations: Sequence[Reservation],
    user_id: str,
) -> list[WouldBeSend]:
    """Dispatch's claim step for the user's would-be sends, in claim-time order: every send due
    at the same moment competes in one `decide_claims` call; a held send is claimed again when
    its quiet hours end."""
    definition = campaign.definition
    results: list[WouldBeSend] = []
    reservations = list(live_reservations)
    held: dict[str, datetime] = {}
    queue: list[tuple[datetime, int, _Planned]] = []
    for index, item in enumerate(planned):
        if item.decision.kind is DecisionKind.HELD_OUT:
            results.append(_would_be(item, user_id, HELD_OUT))
            continue
        heapq.heappush(queue, (item.decision.decided_at, index, item))
    while queue:
        now = queue[0][0]
        batch: list[tuple[int, _Planned]] = []
        while queue and queue[0][0] == now:
            _, index, item = heapq.heappop(queue)
            batch.append((index, item))
        facts = RecipientFacts()
        for event in consent_events:
            if event.received_at <= now:
                facts = project_recipient(facts, event.name, event.properties)
        recipient = facts.recipient()
        tz = user_zone(recipient.timezone, policy.default_timezone)
        by_id = {str(item.decision.send_id): (index, item) for index, item in batch}
        contenders = [
            Contender(
                send_id=str(item.decision.send_id),
                channel=item.channel,
                kind=definition.kind,
                priority=definition.priority,
                decided_at=item.decision.decided_at,
            )
            for _, item in batch
        ]
        verdicts = decide_claims(
            contenders,
            recipient=recipient,
            policy=policy,
            reservations=[r for r in reservations if r.reserved_at <= now],
            now=now,
            tz=tz,
        )
        for verdict in verdicts:
            index, item = by_id[verdict.send_id]
            send_id = str(item.decision.send_id)
            if verdict.verdict is Verdict.HOLD:
                assert verdict.next_at is not None
                held[send_id] = verdict.next_at
                heapq.heappush(queue, (verdict.next_at, index, item))
                continue
            until = held.get(send_id)
            if verdict.verdict is Verdict.SUPPRESS:
                results.append(
                    _would_be(item, user_id, SUPPRESSED, None, until, verdict.code, verdict.reason)
                )
                continue
            if item.render_error is not None:
                results.append(
                    _would_be(item, user_id, RENDER_FAILED, now, until, "", item.render_error)
                )
                continue
            refusal = (
                None
                if item.address is None
                else undeliverable_refusal(item.channel, item.address, recipient)
            )
            if refusal is not None:  # suppressed after the claim: the cap slot is released
                results.append(_would_be(item, user_id, SUPPRESSED, now, until, *refusal))
                continue
            if verdict.reserve_cap:
                reservations.append(Reservation(item.channel, now))
            results.append(_would_be(item, user_id, SENT, now, until))
    return results


def _would_be(
    item: _Planned,
    user_id: str,
    outcome: str,
    claimed_at: datetime | None = None,
    held_until: datetime | None = None,
    code: str = "",
    reason: str = "",
) -> WouldBeSend:
    decision = item.decision
    assert decision.branch is not None
    return WouldBeSend(
        user_id=user_id,
        trigger_event_id=decision.event_id,
        group=item.group,
        branch=decision.branch,
        channel=item.channel,
        due_at=decision.decided_at,
        outcome=outcome,
        claimed_at=claimed_at,
        held_until=held_until,
        code=code,
        reason=reason,
    )


def _is_consent_event(event: RecordedEvent) -> bool:
    return event.name == IDENTIFY or (
        event.name == FAILED and isinstance(event.properties.get("undeliverable_address"), str)
    )


def simulate_user(
    campaign: CompiledCampaign,
    events: Sequence[RecordedEvent],
    *,
    start: datetime,
    end: datetime,
    policy: WorkspacePolicy | None = None,
    global_control: GlobalControl | None = None,
    reservations: Sequence[Reservation] = (),
) -> UserRun:
    """What `campaign` would have done for one user over `[start, end)`.

    `events` are all of the user's events received before `end`, in store (commit) order;
    `reservations` the cap slots the user's live sends of other campaigns hold.
    """
    if not events:
        raise ValueError("simulate_user needs the user's events")
    user_id = events[0].user_id
    consent = [event for event in events if _is_consent_event(event)]
    # Rendering the address is needed only to compare it with a reported one.
    simulation = _UserSimulation(
        campaign, global_control, any(event.name == FAILED for event in consent)
    )
    during: list[RecordedEvent] = []
    for event in events:
        if event.received_at < start:
            simulation.state = evolve(simulation.state, event)
        elif event.received_at < end:
            during.append(event)
    during.sort(key=lambda event: event.received_at)  # stable: commit order among equals
    for event in during:
        simulation.fire_until(event.received_at)
        simulation.apply(event)
    simulation.fire_until(end)
    sends = _claims(
        campaign,
        simulation.planned,
        consent,
        policy or WorkspacePolicy(),
        reservations,
        user_id,
    )
    return UserRun(
        user_id=user_id,
        events=len(during),
        decisions=tuple(simulation.decisions),
        entries=tuple(simulation.entries),
        sends=tuple(sends),
        cancelled_by_exception=simulation.cancelled,
        pending_at_end=len(simulation.member.pending),
    )


def simulate(
    campaign: CompiledCampaign,
    events: Iterable[RecordedEvent],
    *,
    start: datetime,
    end: datetime,
    policy: WorkspacePolicy | None = None,
    global_control: GlobalControl | None = None,
    reservations: Mapping[str, Sequence[Reservation]] | None = None,
) -> BacktestReport:
    """The report for every user of `events` (in store order) that has an event in the period
    `campaign` may be started by."""
    by_user: dict[str, list[RecordedEvent]] = {}
    for event in events:
        by_user.setdefault(event.user_id, []).append(event)
    runs = [
        simulate_user(
            campaign,
            user_events,
            start=start,
            end=end,
            policy=policy,
            global_control=global_control,
            reservations=(reservations or {}).get(user_id, ()),
        )
        for user_id, user_events in by_user.items()
        if involved(campaign, user_events, start, end)
    ]
    return build_report(campaign, start, end, runs)


def involved(
    campaign: CompiledCampaign, events: Iterable[RecordedEvent], start: datetime, end: datetime
) -> bool:
    """Whether the user has an event in the period that may start the campaign."""
    names = campaign.trigger_event_names
    return any(
        start <= event.received_at < end and (names is None or event.name in names)
        for event in events
    )


# --------------------------------------------------------------------------------------------
# Arguments


def parse_moment(text: str, name: str) -> datetime:
    """`YYYY-MM-DD` (midnight UTC) or an ISO 8601 date-time (UTC when it has no offset)."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day, time(0), tzinfo=UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgumentError(
            f"must be a date (YYYY-MM-DD) or an ISO 8601 date-time, got {text!r}", name
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def check_period(
    start: datetime, end: datetime, names: tuple[str, str] = ("from_time", "to_time")
) -> None:
    """InvalidArgumentError (naming the field as `names` call them) unless `start < end` and the
    period is at most `MAX_RANGE`."""
    if start >= end:
        raise InvalidArgumentError(
            f"must be after {names[0]} ({start.isoformat()}), got {end.isoformat()}", names[1]
        )
    if end - start > MAX_RANGE:
        raise InvalidArgumentError(
            f"the period is {(end - start).days} days; at most {MAX_RANGE.days} days", names[1]
        )


def compile_definition(document: Mapping[str, Any]) -> CompiledCampaign:
    """Validate a campaign document like ApplyCampaign (InvalidArgumentError names the field)
    and compile it as the backtest's version."""
    return compile_campaign(validate_campaign(document), BACKTEST_VERSION)


# --------------------------------------------------------------------------------------------
# The shell: read-only loading


INVOLVED_USERS_SQL: Final = """
SELECT DISTINCT user_id FROM events
WHERE workspace_id = $1 AND received_at >= $2 AND received_at < $3
  AND ($4::text[] IS NULL OR name = ANY($4::text[]))
ORDER BY user_id
"""

USER_EVENTS_SQL: Final = """
SELECT global_position, workspace_id, event_id, user_id, name, occurred_at, received_at,
       properties
FROM events
WHERE workspace_id = $1 AND user_id = ANY($2::text[]) AND received_at < $3
ORDER BY user_id, tx_id, global_position
"""
"""The involved users' events before the end of the period, each user's in commit order (the
projector's), one user after another."""

CAP_SLOTS_SQL: Final = """
SELECT user_id, channel, cap_reserved_at FROM sends
WHERE workspace_id = $1 AND user_id = ANY($2::text[]) AND campaign_id <> $3
  AND cap_reserved_at >= $4 AND cap_reserved_at < $5
ORDER BY user_id, cap_reserved_at, send_id
"""
"""Cap slots held by the users' live sends of other campaigns (the backtested campaign's own
live sends are what it replaces)."""


def workspace_settings(
    stored: tuple[Mapping[str, Any], int] | None,
) -> tuple[WorkspacePolicy, GlobalControl | None]:
    """The delivery policy and the global control group from the stored policy document."""
    if stored is None:
        return WorkspacePolicy(), None
    document = dict(stored[0])
    block = document.pop("global_control", None)
    try:
        global_control = None if block is None else parse_global_control(block)
        policy = parse_policy(document)
    except (PolicyError, ExperimentError) as error:  # validated when stored: not expected
        raise InvalidArgumentError(
            f"the stored workspace policy is invalid: {error}", "policy"
        ) from None
    return policy, global_control


async def _users_events(
    conn: Conn, workspace_id: str, users: list[str], end: datetime
) -> AsyncIterator[list[RecordedEvent]]:
    """Each involved user's events, one user at a time."""
    current: list[RecordedEvent] = []
    async for row in conn.cursor(USER_EVENTS_SQL, workspace_id, users, end, prefetch=2000):
        event = store.recorded_event(row)
        if current and current[0].user_id != event.user_id:
            yield current
            current = []
        current.append(event)
    if current:
        yield current


async def run_backtest(
    pool: asyncpg.Pool,
    workspace_id: str,
    document: Mapping[str, Any],
    start: datetime,
    end: datetime,
) -> BacktestReport:
    """Validate, load (one read-only snapshot) and simulate; writes nothing."""
    check_period(start, end)
    campaign = compile_definition(document)
    names = campaign.trigger_event_names
    from services.dispatch import store as dispatch_store

    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        await conn.execute(f"SET LOCAL statement_timeout = '{BACKTEST_STATEMENT_TIMEOUT}'")
        policy, global_control = workspace_settings(
            await dispatch_store.load_policy(conn, workspace_id)
        )
        users = [
            row["user_id"]
            for row in await conn.fetch(
                INVOLVED_USERS_SQL,
                workspace_id,
                start,
                end,
                None if names is None else sorted(names),
            )
        ]
        slots: dict[str, list[Reservation]] = {}
        for row in await conn.fetch(
            CAP_SLOTS_SQL, workspace_id, users, campaign.definition.id, start - CAP_LOOKBACK, end
        ):
            slots.setdefault(row["user_id"], []).append(
                Reservation(row["channel"], row["cap_reserved_at"])
            )
        runs: list[UserRun] = []
        async for events in _users_events(conn, workspace_id, users, end):
            runs.append(
                simulate_user(
                    campaign,
                    events,
                    start=start,
                    end=end,
                    policy=policy,
                    global_control=global_control,
                    reservations=slots.get(events[0].user_id, ()),
                )
            )
    report = build_report(campaign, start, end, runs)
    log.info(
        "backtest of %s over %s..%s: %d users, %d entries, %d would-be sends",
        campaign.definition.id,
        start.isoformat(),
        end.isoformat(),
        report.users,
        len(report.entries),
        len(report.sends),
    )
    return report


__all__ = [
    "MAX_RANGE",
    "BacktestReport",
    "Entry",
    "SimulatedDecision",
    "UserRun",
    "WouldBeSend",
    "build_report",
    "check_period",
    "compile_definition",
    "parse_moment",
    "run_backtest",
    "simulate",
    "simulate_user",
    "workspace_settings",
]
