"""Pure trigger evaluation: (campaign, event, user state) -> decisions. No I/O.

The CEL variables for one event are built once (`EvaluationContext`) and shared by every campaign
evaluated for it: the event view, the user view (state *after* the event, at `now`), and one CEL
activation. Numbers in event properties and traits are passed as CEL doubles (see
`services.rules.cel`). `now` is the event's `received_at` during projection and the timer's fire
time at send time, so every decision depends on stored data only (replay gives the same ones).

The four triggers, each evaluated against state that already includes the event:

- action: the event named by the trigger, `where` true. Check order, cheapest first so that most
  non-entries cost no CEL at all: paused → correlation key present → one pending instance per
  (user, campaign, correlation) → re-eligibility → `trigger.where` → `audience` → triggered.
- inactivity: every occurrence of the event arms the user's check at `received_at + for +
  delay`; while an instance is pending it is re-armed (`rearmed`), so there is one pending
  instance (and one timer, whose id is the instance id) per user and campaign. At fire time the
  check is repeated on fresh state: the user must really have had no such event for `for`.
- after_first: the first occurrence of the event ever (count 1 after folding) arms one instance
  at `received_at + offset + delay`; later occurrences decide nothing.
- threshold: an edge. The condition is evaluated on the state after the event and, only when
  that is true, on the state before it (both at `now`); the campaign triggers when it went from
  false to true. Events whose names cannot change the condition are skipped
  (`CompiledCampaign.trigger_event_names`). A condition that becomes true only because time
  passes (a window emptying) is noticed at the user's next relevant event, never by a clock.

Evaluation errors become `error` decisions carrying the expression's path and message; nothing
raises for bad data. A threshold records an error only when it starts failing (the state before
the event evaluated without error), so a condition that fails for a user fails once, not on
every event.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from services.rules.cel import (
    Activation,
    CelEvaluationError,
    CompiledCampaign,
    CompiledExpression,
    activation,
    json_numbers_as_double,
)
from services.rules.domain import (
    DEFAULT_LIFECYCLE,
    ActionTrigger,
    AfterFirstTrigger,
    Decision,
    DecisionKind,
    InactivityTrigger,
    LifecyclePolicy,
    Membership,
    PendingInstance,
    RecordedEvent,
    ThresholdTrigger,
    UserState,
    cel_view,
    correlation_value,
    event_view,
    format_duration,
    instance_id,
    is_reeligible,
    send_id,
)
from services.rules.experiments import (
    RESERVED_GROUPS,
    Assignment,
    GlobalControl,
    applicable_global_control,
    assign,
)


def cel_event(event: RecordedEvent) -> dict[str, Any]:
    """The event view with JSON numbers as CEL doubles."""
    view = event_view(event)
    view["properties"] = json_numbers_as_double(event.properties)
    return view


class EvaluationContext:
    """CEL variables for one event and the user state after it, built lazily, once.

    `referenced_event_names` must cover every campaign evaluated with this context (None: the
    view holds every event name of the user); `for_campaigns` computes it.
    """

    __slots__ = (
        "_activation",
        "_event",
        "_event_activation",
        "_user",
        "event",
        "now",
        "policy",
        "referenced_event_names",
        "state",
        "sum_properties",
    )

    def __init__(
        self,
        event: RecordedEvent,
        state: UserState,
        now: datetime,
        *,
        referenced_event_names: frozenset[str] | None,
        sum_properties: frozenset[str] = frozenset(),
        policy: LifecyclePolicy = DEFAULT_LIFECYCLE,
    ) -> None:
        self.event = event
        self.state = state
        self.now = now
        self.referenced_event_names = referenced_event_names
        self.sum_properties = sum_properties
        self.policy = policy
        self._event: dict[str, Any] | None = None
        self._user: dict[str, Any] | None = None
        self._activation: Activation | None = None
        self._event_activation: Activation | None = None

    @classmethod
    def for_campaigns(
        cls,
        event: RecordedEvent,
        state: UserState,
        now: datetime,
        campaigns: Iterable[CompiledCampaign],
        policy: LifecyclePolicy = DEFAULT_LIFECYCLE,
    ) -> EvaluationContext:
        """A context whose user view serves every one of `campaigns`."""
        names: set[str] | None = set()
        sums: set[str] = set()
        for campaign in campaigns:
            sums |= campaign.sum_properties
            if names is not None:
                if campaign.referenced_event_names is None:
                    names = None
                else:
                    names |= campaign.referenced_event_names
        return cls(
            event,
            state,
            now,
            referenced_event_names=None if names is None else frozenset(names),
            sum_properties=frozenset(sums),
            policy=policy,
        )

    def covers(self, campaign: CompiledCampaign) -> bool:
        """Whether this context's user view holds what `campaign` references."""
        if self.referenced_event_names is not None and (
            campaign.referenced_event_names is None
            or not campaign.referenced_event_names <= self.referenced_event_names
        ):
            return False
        return campaign.sum_properties <= self.sum_properties

    @property
    def event_data(self) -> dict[str, Any]:
        """`event` (and `trigger`) as CEL sees it."""
        if self._event is None:
            self._event = cel_event(self.event)
        return self._event

    @property
    def user_data(self) -> dict[str, Any]:
        """`user` as CEL sees it (state after the event, at `now`)."""
        if self._user is None:
            view = cel_view(
                self.state,
                self.now,
                self.referenced_event_names,
                sum_properties=self.sum_properties,
                policy=self.policy,
            )
            view["traits"] = json_numbers_as_double(view["traits"])
            self._user = view
        return self._user

    @property
    def activation(self) -> Activation:
        """Variables `event`, `trigger` (the same event) and `user`."""
        if self._activation is None:
            event = self.event_data
            self._activation = activation(
                {"event": event, "trigger": event, "user": self.user_data}
            )
        return self._activation

    def activation_for(self, expression: CompiledExpression) -> Activation:
        """The activation for `expression`: without the user view (whose construction costs
        more than most evaluations) when the expression never mentions `user`."""
        if "user" in expression.references or self._activation is not None:
            return self.activation
        if self._event_activation is None:
            event = self.event_data
            self._event_activation = activation({"event": event, "trigger": event})
        return self._event_activation


def _context_for(
    campaign: CompiledCampaign,
    event: RecordedEvent,
    state: UserState,
    now: datetime,
    context: EvaluationContext | None,
) -> EvaluationContext:
    if context is None:
        return EvaluationContext(
            event,
            state,
            now,
            referenced_event_names=campaign.referenced_event_names,
            sum_properties=campaign.sum_properties,
        )
    if not context.covers(campaign):
        raise ValueError(
            f"the evaluation context does not hold what campaign {campaign.definition.id!r} "
            "references; build it with EvaluationContext.for_campaigns"
        )
    return context


class _Decider:
    """Shared fields of the decisions about one campaign and one cause."""

    __slots__ = ("_assignment", "campaign", "event", "global_control", "instance", "now")

    def __init__(
        self,
        campaign: CompiledCampaign,
        event: RecordedEvent,
        now: datetime,
        instance: UUID | None = None,
        *,
        global_control: GlobalControl | None = None,
    ) -> None:
        self.campaign = campaign
        self.event = event
        self.now = now
        self.instance = instance
        self.global_control = global_control
        self._assignment: Assignment | None = None

    @property
    def assignment(self) -> Assignment:
        """The user's experiment group in this campaign (computed once, when needed)."""
        if self._assignment is None:
            definition = self.campaign.definition
            self._assignment = assign(
                self.event.workspace_id,
                definition.id,
                self.event.user_id,
                definition.experiment,
                global_control=applicable_global_control(definition.kind, self.global_control),
            )
        return self._assignment

    def decide(self, kind: DecisionKind, reason: str, **extra: Any) -> Decision:
        if self.instance is not None:
            extra.setdefault("instance_id", self.instance)
        return Decision(
            kind=kind,
            workspace_id=self.event.workspace_id,
            campaign_id=self.campaign.definition.id,
            version=self.campaign.version,
            user_id=self.event.user_id,
            event_id=self.event.event_id,
            decided_at=self.now,
            reason=reason,
            **extra,
        )

    def check(
        self, expression: CompiledExpression | None, path: str, context: EvaluationContext
    ) -> bool | Decision:
        """The predicate's value (True when absent), or an `error` decision."""
        if expression is None:
            return True
        try:
            return expression.evaluate_bool(context.activation_for(expression))
        except CelEvaluationError as error:
            return self.decide(
                DecisionKind.ERROR,
                f"{path} failed: {error.message}",
                error=error.message,
                detail={"path": path, "expression": error.source},
            )


def _not_reeligible_reason(reeligibility: timedelta | None, last_sent_at: datetime) -> str:
    if reeligibility is None:
        return f"already received at {last_sent_at.isoformat()} (once per user)"
    return (
        f"already received at {last_sent_at.isoformat()}; "
        f"re-eligible after {format_duration(reeligibility)}"
    )


def _is_paused(campaign: CompiledCampaign, paused: bool | None) -> bool:
    return paused if paused is not None else campaign.definition.status == "paused"


def decide_on_event(
    campaign: CompiledCampaign,
    event: RecordedEvent,
    state_after: UserState,
    membership: Membership,
    now: datetime,
    *,
    context: EvaluationContext | None = None,
    paused: bool | None = None,
    state_before: UserState | None = None,
    global_control: GlobalControl | None = None,
) -> list[Decision]:
    """Decisions of one campaign about one event (`state_after` already includes the event).

    An entry (`triggered`) is assigned its experiment group (`experiments.assign`; the
    workspace's `global_control` applies to marketing campaigns only): the decision's `detail`
    holds `group`, `bucket` and `salt`, and its due time uses the group's delay.

    `paused` overrides the definition's status (the live status is kept beside the version).
    `state_before` is the user's state before the event (None for a new user); only threshold
    triggers read it. Returns no decision when the event does not concern the trigger, else
    one of `paused`, `error`, `already_pending`, `not_reeligible`, `filtered_out`,
    `audience_excluded`, `rearmed` or `triggered` — preceded by a `cancelled` decision when an
    inactivity re-arm supersedes a pending instance of an older version.
    """
    trigger = campaign.definition.trigger
    if isinstance(trigger, ActionTrigger):
        if trigger.event != event.name:
            return []
        return _decide_action(
            campaign, event, state_after, membership, now, context, paused, global_control
        )
    if isinstance(trigger, InactivityTrigger):
        if trigger.event != event.name:
            return []
        return _decide_inactivity(
            campaign, trigger, event, state_after, membership, now, context, paused, global_control
        )
    if isinstance(trigger, AfterFirstTrigger):
        stats = state_after.events.get(trigger.event)
        if trigger.event != event.name or stats is None or stats.count != 1:
            return []
        decider = _Decider(campaign, event, now, global_control=global_control)
        return [
            _enter(
                decider,
                campaign,
                _context_for(campaign, event, state_after, now, context),
                membership,
                paused,
                base_due=stats.first_at + trigger.offset,
                why=f"first {event.name}; due {format_duration(trigger.offset)} later",
            )
        ]
    return _decide_threshold(
        campaign,
        trigger,
        event,
        state_before,
        state_after,
        membership,
        now,
        context,
        paused,
        global_control,
    )


def _decide_action(
    campaign: CompiledCampaign,
    event: RecordedEvent,
    state_after: UserState,
    membership: Membership,
    now: datetime,
    context: EvaluationContext | None,
    paused: bool | None,
    global_control: GlobalControl | None,
) -> list[Decision]:
    definition = campaign.definition
    decider = _Decider(campaign, event, now, global_control=global_control)
    if _is_paused(campaign, paused):
        return [decider.decide(DecisionKind.PAUSED, "campaign is paused")]
    correlation = ""
    if definition.correlation_key is not None:
        value = correlation_value(event.properties.get(definition.correlation_key))
        if value is None:
            message = f"the trigger event has no property {definition.correlation_key!r}"
            return [
                decider.decide(
                    DecisionKind.ERROR,
                    f"correlation_key: {message}",
                    error=message,
                    detail={"path": "correlation_key"},
                )
            ]
        correlation = value
    data = _context_for(campaign, event, state_after, now, context)
    return [
        _enter(
            decider,
            campaign,
            data,
            membership,
            False,
            base_due=now,
            correlation=correlation,
            where=campaign.where,
        )
    ]


def _enter(
    decider: _Decider,
    campaign: CompiledCampaign,
    data: EvaluationContext,
    membership: Membership,
    paused: bool | None,
    *,
    base_due: datetime,
    correlation: str = "",
    where: CompiledExpression | None = None,
    why: str = "",
    eligible_at_due: bool = False,
) -> Decision:
    """The checks every trigger shares once it fired: paused → one pending instance →
    re-eligibility (at the due time with `eligible_at_due`, else now) → `where` → `audience` →
    triggered, due at `base_due` plus the delay of the user's experiment group."""
    definition = campaign.definition
    if _is_paused(campaign, paused):
        return decider.decide(DecisionKind.PAUSED, "campaign is paused")
    if correlation in membership.pending:
        reason = "an instance is already pending" + (
            f" for {definition.correlation_key} {correlation!r}" if correlation else ""
        )
        return decider.decide(DecisionKind.ALREADY_PENDING, reason, correlation=correlation)
    if eligible_at_due:
        eligible_at = base_due + campaign.delay_for(decider.assignment.group)
    else:
        eligible_at = decider.now
    if not is_reeligible(definition.reeligibility, membership.last_sent_at, eligible_at):
        assert membership.last_sent_at is not None
        reason = _not_reeligible_reason(definition.reeligibility, membership.last_sent_at)
        return decider.decide(DecisionKind.NOT_REELIGIBLE, reason, correlation=correlation)
    passed = decider.check(where, "trigger.where", data)
    if isinstance(passed, Decision):
        return passed
    if not passed:
        return decider.decide(DecisionKind.FILTERED_OUT, "trigger.where is false")
    passed = decider.check(campaign.audience, "audience", data)
    if isinstance(passed, Decision):
        return passed
    if not passed:
        return decider.decide(DecisionKind.AUDIENCE_EXCLUDED, "audience is false")
    event = decider.event
    assignment = decider.assignment
    due_at = base_due + campaign.delay_for(assignment.group)
    delayed = due_at > decider.now
    when = f"delayed until {due_at.isoformat()}" if delayed else "send now"
    reason = f"{why}; {when}" if why else when
    if definition.experiment is not None or assignment.held_out:
        reason = f"{reason}; {assignment.reason}"
    return decider.decide(
        DecisionKind.TRIGGERED,
        reason,
        instance_id=instance_id(
            event.workspace_id,
            definition.id,
            campaign.version,
            event.user_id,
            correlation,
            event.event_id,
        ),
        correlation=correlation,
        due_at=due_at,
        delayed_until=due_at if delayed else None,
        detail={
            "group": assignment.group,
            "bucket": assignment.bucket,
            "salt": definition.experiment.salt if definition.experiment is not None else "",
        },
    )


def _decide_inactivity(
    campaign: CompiledCampaign,
    trigger: InactivityTrigger,
    event: RecordedEvent,
    state_after: UserState,
    membership: Membership,
    now: datetime,
    context: EvaluationContext | None,
    paused: bool | None,
    global_control: GlobalControl | None,
) -> list[Decision]:
    definition = campaign.definition
    decider = _Decider(campaign, event, now, global_control=global_control)
    quiet = f"no {trigger.event} for {format_duration(trigger.duration)}"
    pending = membership.pending_instance("")
    decisions: list[Decision] = []
    if "" in membership.pending:
        if pending is None:  # the caller did not say which instance: nothing to re-arm
            return [decider.decide(DecisionKind.ALREADY_PENDING, "an instance is already pending")]
        if pending.version == campaign.version or _is_paused(campaign, paused):
            due_at = now + trigger.duration + campaign.delay_for(pending.group)
            return [
                decider.decide(
                    DecisionKind.REARMED,
                    f"re-armed by {event.name}: sends at {due_at.isoformat()} if {quiet}",
                    instance_id=pending.instance_id,
                    due_at=due_at,
                    delayed_until=due_at,
                    detail={"previous_due_at": pending.due_at.isoformat()},
                )
            ]
        decisions.append(
            Decision(
                kind=DecisionKind.CANCELLED,
                workspace_id=event.workspace_id,
                campaign_id=definition.id,
                version=pending.version,
                user_id=event.user_id,
                event_id=event.event_id,
                decided_at=now,
                reason=f"superseded by version {campaign.version} (re-armed by {event.name})",
                instance_id=pending.instance_id,
                detail={"superseded_by": campaign.version},
            )
        )
        membership = Membership(
            last_entered_at=membership.last_entered_at,
            last_sent_at=membership.last_sent_at,
            pending=membership.pending - {""},
        )
    data = _context_for(campaign, event, state_after, now, context)
    decisions.append(
        _enter(
            decider,
            campaign,
            data,
            membership,
            paused,
            base_due=now + trigger.duration,
            why=f"armed by {event.name}: sends if {quiet}",
            eligible_at_due=True,
        )
    )
    return decisions


def _decide_threshold(
    campaign: CompiledCampaign,
    trigger: ThresholdTrigger,
    event: RecordedEvent,
    state_before: UserState | None,
    state_after: UserState,
    membership: Membership,
    now: datetime,
    context: EvaluationContext | None,
    paused: bool | None,
    global_control: GlobalControl | None,
) -> list[Decision]:
    names = campaign.trigger_event_names
    if names is not None and event.name not in names:
        return []
    decider = _Decider(campaign, event, now, global_control=global_control)
    data = _context_for(campaign, event, state_after, now, context)
    after = decider.check(campaign.threshold, "trigger.threshold", data)
    if after is False:
        return []
    before: bool | Decision = False
    if state_before is not None:
        before_data = EvaluationContext(
            event,
            state_before,
            now,
            referenced_event_names=campaign.referenced_event_names,
            sum_properties=campaign.sum_properties,
        )
        before = decider.check(campaign.threshold, "trigger.threshold", before_data)
    if isinstance(after, Decision):
        return [] if isinstance(before, Decision) else [after]
    if before is True:
        return []  # already true before this event: a level, not an edge
    return [
        _enter(
            decider,
            campaign,
            data,
            membership,
            paused,
            base_due=now,
            why="threshold crossed",
        )
    ]


def decide_exception(
    campaign: CompiledCampaign,
    event: RecordedEvent,
    pending: PendingInstance,
    state_after: UserState,
    now: datetime,
) -> Decision | None:
    """Whether `event` cancels the `pending` instance of `campaign` (the instance's version).

    The first exception rule naming the event whose `match` is absent or true cancels it
    (`cancelled`). Variables of `match`: `exception` (this event), `trigger` (the event that
    armed the instance) and `user` (state after this event, at `now`). When no rule cancels and
    a `match` failed to evaluate, the `error` decision is returned (the instance stays pending);
    None when the event does not cancel the instance.
    """
    definition = campaign.definition
    decider = _Decider(campaign, event, now, pending.instance_id)
    failure: Decision | None = None
    variables: dict[str, Any] | None = None
    user: dict[str, Any] | None = None
    for index, rule in enumerate(definition.exceptions):
        if rule.event != event.name:
            continue
        match = campaign.exception_matches[index]
        path = f"exceptions[{index}].match"
        if match is not None:
            if variables is None:
                variables = {"exception": cel_event(event), "trigger": cel_event(pending.trigger)}
            if "user" in match.references and user is None:
                user = EvaluationContext(
                    event,
                    state_after,
                    now,
                    referenced_event_names=campaign.referenced_event_names,
                    sum_properties=campaign.sum_properties,
                ).user_data
                variables["user"] = user
            try:
                matched = match.evaluate_bool(activation(variables))
            except CelEvaluationError as error:
                failure = failure or decider.decide(
                    DecisionKind.ERROR,
                    f"{path} failed: {error.message}",
                    error=error.message,
                    correlation=pending.correlation,
                    detail={"path": path, "expression": error.source},
                )
                continue
            if not matched:
                continue
        matched_by = f" ({path} is true)" if match is not None else ""
        return decider.decide(
            DecisionKind.CANCELLED,
            f"cancelled by {event.name} {event.event_id!r}{matched_by}",
            correlation=pending.correlation,
            detail={"exception": event.name, "rule": index},
        )
    return failure


def decide_at_fire(
    campaign: CompiledCampaign,
    trigger_event: RecordedEvent,
    state: UserState,
    membership: Membership,
    now: datetime,
    *,
    instance: UUID | None = None,
    paused: bool | None = None,
    group: str | None = None,
) -> Decision:
    """Re-check a pending instance when its timer fires, against fresh state.

    `group` is the instance's experiment group: its delay re-arms an inactivity instance, its
    messages are the variant's, and for a held-out group (`control`, `global_control`) the
    decision that would have been `send_planned` is `held_out` (same branch and send id;
    nothing is sent, the user is measured).

    `instance` is the pending instance's id (copied into the decision). `membership` is the
    user's history with the campaign excluding this instance (its own pending
    entry is not a conflict). Returns `paused` (keep the instance pending), `still_active`
    (inactivity: an event arrived within the span; keep it pending, a re-armed timer follows),
    `not_reeligible`, `audience_excluded`, `no_matching_message`, `error`, or `send_planned`
    with the first matching message branch and its deterministic `send_id`. Variables: `user`
    (fresh state at `now`), and `event` / `trigger` (the triggering event).
    """
    definition = campaign.definition
    decider = _Decider(campaign, trigger_event, now, instance)
    if _is_paused(campaign, paused):
        return decider.decide(DecisionKind.PAUSED, "campaign is paused; the instance waits")
    trigger = definition.trigger
    if isinstance(trigger, InactivityTrigger):
        stats = state.events.get(trigger.event)
        if stats is not None and stats.last_at + trigger.duration > now:
            due_at = stats.last_at + trigger.duration + campaign.delay_for(group)
            return decider.decide(
                DecisionKind.STILL_ACTIVE,
                f"re-checked: {trigger.event} at {stats.last_at.isoformat()}, not inactive for "
                f"{format_duration(trigger.duration)}; waits until {due_at.isoformat()}",
                due_at=due_at,
            )
    if not is_reeligible(definition.reeligibility, membership.last_sent_at, now):
        assert membership.last_sent_at is not None
        reason = _not_reeligible_reason(definition.reeligibility, membership.last_sent_at)
        return decider.decide(DecisionKind.NOT_REELIGIBLE, reason)
    data = _context_for(campaign, trigger_event, state, now, None)
    passed = decider.check(campaign.audience, "audience", data)
    if isinstance(passed, Decision):
        return passed
    if not passed:
        return decider.decide(DecisionKind.AUDIENCE_EXCLUDED, "audience is false at send time")
    for index, condition in enumerate(campaign.branch_conditions):
        passed = decider.check(condition, f"messages[{index}].when", data)
        if isinstance(passed, Decision):
            return passed
        if passed:
            channel = campaign.messages_for(group)[index].message.channel
            held_out = group in RESERVED_GROUPS
            return decider.decide(
                DecisionKind.HELD_OUT if held_out else DecisionKind.SEND_PLANNED,
                f"re-checked; would have sent message {index} ({channel}); held out: {group}"
                if held_out
                else f"re-checked and sent: message {index} ({channel})",
                branch=index,
                send_id=send_id(
                    trigger_event.workspace_id,
                    definition.id,
                    campaign.version,
                    trigger_event.user_id,
                    trigger_event.event_id,
                    channel,
                ),
            )
    return decider.decide(DecisionKind.NO_MATCHING_MESSAGE, "no message branch matched")


def conversion_matches(
    campaign: CompiledCampaign,
    event: RecordedEvent,
    trigger: RecordedEvent,
    state_after: UserState,
    now: datetime,
) -> bool | str:
    """Whether `event` satisfies the campaign's `conversion.match` for the instance `trigger`
    started (True without a `match`), or the evaluation error's message. Variables:
    `conversion` (this event), `trigger`, and `user` (state after this event, at `now`, the
    view every other expression of the campaign gets)."""
    match = campaign.conversion_match
    if match is None:
        return True
    variables: dict[str, Any] = {"conversion": cel_event(event), "trigger": cel_event(trigger)}
    if "user" in match.references:
        variables["user"] = EvaluationContext(
            event,
            state_after,
            now,
            referenced_event_names=campaign.referenced_event_names,
            sum_properties=campaign.sum_properties,
        ).user_data
    try:
        return match.evaluate_bool(activation(variables))
    except CelEvaluationError as error:
        return error.message
