"""Pure trigger evaluation: (campaign, event, user state) -> decisions. No I/O.

The CEL variables for one event are built once (`EvaluationContext`) and shared by every campaign
evaluated for it: the event view, the user view (state *after* the event, at `now`), and one CEL
activation. Numbers in event properties and traits are passed as CEL doubles (see
`services.rules.cel`).

Check order for an action trigger, cheapest first so that most non-entries cost no CEL at all:
paused → correlation key present → one pending instance per (user, campaign, correlation) →
re-eligibility → `trigger.where` → `audience` → triggered. Evaluation errors become `error`
decisions carrying the expression's path and message; nothing raises for bad data.
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
    Decision,
    DecisionKind,
    LifecyclePolicy,
    Membership,
    RecordedEvent,
    UserState,
    cel_view,
    correlation_value,
    event_view,
    format_duration,
    instance_id,
    is_reeligible,
    send_id,
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

    __slots__ = ("campaign", "event", "instance", "now")

    def __init__(
        self,
        campaign: CompiledCampaign,
        event: RecordedEvent,
        now: datetime,
        instance: UUID | None = None,
    ) -> None:
        self.campaign = campaign
        self.event = event
        self.now = now
        self.instance = instance

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


def decide_on_event(
    campaign: CompiledCampaign,
    event: RecordedEvent,
    state_after: UserState,
    membership: Membership,
    now: datetime,
    *,
    context: EvaluationContext | None = None,
    paused: bool | None = None,
) -> list[Decision]:
    """Decisions of one campaign about one event (state already includes the event).

    Handles action triggers (issue 2); other trigger kinds return no decision here. `paused`
    overrides the definition's status (the live status is kept beside the version). Returns at
    most one decision: `paused`, `error`, `already_pending`, `not_reeligible`, `filtered_out`,
    `audience_excluded` or `triggered`.
    """
    definition = campaign.definition
    trigger = definition.trigger
    if not isinstance(trigger, ActionTrigger) or trigger.event != event.name:
        return []
    decider = _Decider(campaign, event, now)
    if paused if paused is not None else definition.status == "paused":
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
    if correlation in membership.pending:
        reason = "an instance is already pending" + (
            f" for {definition.correlation_key} {correlation!r}" if correlation else ""
        )
        return [decider.decide(DecisionKind.ALREADY_PENDING, reason, correlation=correlation)]
    if not is_reeligible(definition.reeligibility, membership.last_sent_at, now):
        assert membership.last_sent_at is not None
        reason = _not_reeligible_reason(definition.reeligibility, membership.last_sent_at)
        return [decider.decide(DecisionKind.NOT_REELIGIBLE, reason, correlation=correlation)]
    data = _context_for(campaign, event, state_after, now, context)
    passed = decider.check(campaign.where, "trigger.where", data)
    if isinstance(passed, Decision):
        return [passed]
    if not passed:
        return [decider.decide(DecisionKind.FILTERED_OUT, "trigger.where is false")]
    passed = decider.check(campaign.audience, "audience", data)
    if isinstance(passed, Decision):
        return [passed]
    if not passed:
        return [decider.decide(DecisionKind.AUDIENCE_EXCLUDED, "audience is false")]
    due_at = now + definition.delay
    delayed = definition.delay > timedelta(0)
    return [
        decider.decide(
            DecisionKind.TRIGGERED,
            f"delayed until {due_at.isoformat()}" if delayed else "send now",
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
        )
    ]


def decide_at_fire(
    campaign: CompiledCampaign,
    trigger_event: RecordedEvent,
    state: UserState,
    membership: Membership,
    now: datetime,
    *,
    instance: UUID | None = None,
    paused: bool | None = None,
) -> Decision:
    """Re-check a pending instance when its timer fires, against fresh state.

    `instance` is the pending instance's id (copied into the decision). `membership` is the
    user's history with the campaign excluding this instance (its own pending
    entry is not a conflict). Returns `paused` (keep the instance pending), `not_reeligible`,
    `audience_excluded`, `no_matching_message`, `error`, or `send_planned` with the first
    matching message branch and its deterministic `send_id`. Variables: `user` (fresh state at
    `now`), and `event` / `trigger` (the triggering event).
    """
    definition = campaign.definition
    decider = _Decider(campaign, trigger_event, now, instance)
    if paused if paused is not None else definition.status == "paused":
        return decider.decide(DecisionKind.PAUSED, "campaign is paused; the instance waits")
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
            channel = definition.messages[index].message.channel
            return decider.decide(
                DecisionKind.SEND_PLANNED,
                f"message {index} ({channel})",
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
