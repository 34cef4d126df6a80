"""The RulesService servicer: campaigns as code, and users' engagement state."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc

from nudge.auth import KeyVerifier
from nudge.grpcserver import InvalidArgumentError, NotFoundError, bearer, maps_errors
from nudge.protoconv import dict_to_struct, struct_to_dict, to_timestamp
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc
from services.rules import backtest, campaign_stats, explain, replay, stats, store
from services.rules.application import CampaignAdmin, UserViews
from services.rules.domain import format_duration

Context = grpc.aio.ServicerContext[Any, Any]


def _campaign(version: store.CampaignVersion) -> rules_pb2.Campaign:
    return rules_pb2.Campaign(
        campaign_id=version.campaign_id,
        version=version.version,
        definition=dict_to_struct(version.definition),
        created_at=to_timestamp(version.created_at),
        status=version.status,
    )


def _interval(bounds: tuple[float, float] | None) -> rules_pb2.RateInterval | None:
    return None if bounds is None else rules_pb2.RateInterval(low=bounds[0], high=bounds[1])


def _comparison(comparison: stats.Comparison | None) -> rules_pb2.VariantComparison | None:
    if comparison is None:
        return None
    verdict = comparison.verdict
    return rules_pb2.VariantComparison(
        baseline=comparison.baseline,
        absolute_uplift=comparison.absolute_uplift,
        relative_uplift=comparison.relative_uplift,
        uplift_interval=_interval(comparison.difference_interval),
        test=comparison.test.method if comparison.test is not None else "",
        p_value=comparison.test.p_value if comparison.test is not None else None,
        adjusted_p_value=comparison.adjusted_p_value,
        verdict=verdict.kind.value,
        verdict_text=verdict.text,
        users_needed_per_arm=verdict.users_needed_per_arm or 0,
        target_difference=verdict.target_difference or 0.0,
    )


def _group_stats(group: campaign_stats.GroupStats) -> rules_pb2.CampaignGroupStats:
    arm = group.arm
    return rules_pb2.CampaignGroupStats(
        group=group.group,
        role=group.role,
        entered=group.entered,
        instances=group.instances,
        pending=group.pending,
        held_out=group.held_out,
        cancelled=group.cancelled,
        cancelled_by_exception=group.cancelled_by_exception,
        suppressed=group.suppressed,
        suppressed_reasons=dict(group.suppressed_reasons),
        sent=group.sent,
        delivered=group.delivered,
        failed=group.failed,
        suppressed_downstream=group.suppressed_downstream,
        suppressed_codes=dict(group.suppressed_codes),
        opened=group.opened,
        clicked=group.clicked,
        converted=group.converted,
        converted_attributed=group.converted_attributed,
        rate=arm.rate if arm is not None else None,
        rate_interval=_interval(arm.interval if arm is not None else None),
        comparison=_comparison(group.comparison),
    )


class RulesServicer(rules_pb2_grpc.RulesServiceServicer):
    """ApplyCampaign, GetCampaign, ListCampaigns, GetUser, PauseCampaign, ResumeCampaign,
    ExplainDecisions, VerifyProjection, GetCampaignStats, Backtest."""

    def __init__(
        self, pool: asyncpg.Pool, verifier: KeyVerifier, admin: CampaignAdmin, users: UserViews
    ) -> None:
        self._pool = pool
        self._verifier = verifier
        self._admin = admin
        self._users = users

    async def _workspace(self, context: Context) -> str:
        principal = await self._verifier.verify(bearer(context))
        principal.require("admin")
        return principal.workspace_id

    @maps_errors
    async def ApplyCampaign(
        self, request: rules_pb2.ApplyCampaignRequest, context: Context
    ) -> rules_pb2.ApplyCampaignResponse:
        """Validate and store a campaign definition as a new version if it changed."""
        workspace_id = await self._workspace(context)
        version, created = await self._admin.apply(workspace_id, struct_to_dict(request.definition))
        return rules_pb2.ApplyCampaignResponse(campaign=_campaign(version), created=created)

    @maps_errors
    async def GetCampaign(
        self, request: rules_pb2.GetCampaignRequest, context: Context
    ) -> rules_pb2.GetCampaignResponse:
        """The current version of one campaign."""
        workspace_id = await self._workspace(context)
        if not request.campaign_id:
            raise InvalidArgumentError("is required", "campaign_id")
        version = await store.current_campaign(self._pool, workspace_id, request.campaign_id)
        if version is None:
            raise NotFoundError(f"no campaign {request.campaign_id!r}")
        return rules_pb2.GetCampaignResponse(campaign=_campaign(version))

    @maps_errors
    async def ListCampaigns(
        self, request: rules_pb2.ListCampaignsRequest, context: Context
    ) -> rules_pb2.ListCampaignsResponse:
        """Current versions of all campaigns of the workspace."""
        workspace_id = await self._workspace(context)
        versions = await store.current_campaigns(self._pool, workspace_id)
        return rules_pb2.ListCampaignsResponse(campaigns=[_campaign(v) for v in versions])

    @maps_errors
    async def GetUser(
        self, request: rules_pb2.GetUserRequest, context: Context
    ) -> rules_pb2.GetUserResponse:
        """A user's engagement state as CEL sees it."""
        workspace_id = await self._workspace(context)
        if not request.user_id:
            raise InvalidArgumentError("is required", "user_id")
        view = await self._users.view(workspace_id, request.user_id)
        if view is None:
            raise NotFoundError(f"no events projected for user {request.user_id!r}")
        return rules_pb2.GetUserResponse(state=dict_to_struct(view))

    @maps_errors
    async def PauseCampaign(
        self, request: rules_pb2.PauseCampaignRequest, context: Context
    ) -> rules_pb2.PauseCampaignResponse:
        """Stop new instances and sends; pending instances wait."""
        workspace_id = await self._workspace(context)
        if not request.campaign_id:
            raise InvalidArgumentError("is required", "campaign_id")
        version = await self._admin.set_status(workspace_id, request.campaign_id, "paused")
        return rules_pb2.PauseCampaignResponse(campaign=_campaign(version))

    @maps_errors
    async def ResumeCampaign(
        self, request: rules_pb2.ResumeCampaignRequest, context: Context
    ) -> rules_pb2.ResumeCampaignResponse:
        """Resume; instances that came due while paused are re-checked at once."""
        workspace_id = await self._workspace(context)
        if not request.campaign_id:
            raise InvalidArgumentError("is required", "campaign_id")
        version = await self._admin.set_status(workspace_id, request.campaign_id, "active")
        return rules_pb2.ResumeCampaignResponse(campaign=_campaign(version))

    @maps_errors
    async def ExplainDecisions(
        self, request: rules_pb2.ExplainDecisionsRequest, context: Context
    ) -> rules_pb2.ExplainDecisionsResponse:
        """Every decision for a user and campaign, with dispatch's outcomes."""
        workspace_id = await self._workspace(context)
        if not request.user_id:
            raise InvalidArgumentError("is required", "user_id")
        if not request.campaign_id:
            raise InvalidArgumentError("is required", "campaign_id")
        lines = await explain.explain(
            self._pool, workspace_id, request.user_id, request.campaign_id
        )
        return rules_pb2.ExplainDecisionsResponse(
            decisions=[
                rules_pb2.DecisionRecord(
                    decided_at=to_timestamp(line.decided_at),
                    source=line.source,
                    kind=line.kind,
                    reason=line.reason,
                    summary=line.summary,
                    version=line.version,
                    instance_id=line.instance_id or "",
                    event_id=line.event_id or "",
                    send_id=line.send_id or "",
                    detail=dict_to_struct(line.detail),
                )
                for line in lines
            ]
        )

    @maps_errors
    async def VerifyProjection(
        self, request: rules_pb2.VerifyProjectionRequest, context: Context
    ) -> rules_pb2.VerifyProjectionResponse:
        """Replay the workspace's events and compare with the live user states (C4)."""
        workspace_id = await self._workspace(context)
        report = await replay.verify_projection(self._pool, workspace_id)
        return rules_pb2.VerifyProjectionResponse(
            match=report.match,
            users=report.users,
            events=report.events,
            checkpoint=f"{report.checkpoint.tx_id}/{report.checkpoint.position}",
            mismatch_count=report.mismatch_count,
            assignments=report.assignments,
            mismatches=[
                rules_pb2.UserMismatch(user_id=m.user_id, problem=m.problem, fields=m.fields)
                for m in report.mismatches
            ],
        )

    @maps_errors
    async def GetCampaignStats(
        self, request: rules_pb2.GetCampaignStatsRequest, context: Context
    ) -> rules_pb2.GetCampaignStatsResponse:
        """Per-group counts, conversion rates, uplift and verdicts since the current salt."""
        workspace_id = await self._workspace(context)
        if not request.campaign_id:
            raise InvalidArgumentError("is required", "campaign_id")
        report = await campaign_stats.campaign_stats(self._pool, workspace_id, request.campaign_id)
        conversion = report.conversion
        return rules_pb2.GetCampaignStatsResponse(
            campaign_id=report.campaign_id,
            version=report.version,
            salt=report.salt,
            baseline=report.baseline or "",
            conversion_event=conversion.event if conversion is not None else "",
            conversion_within=format_duration(conversion.within) if conversion is not None else "",
            horizon=format_duration(report.horizon) if report.horizon is not None else "",
            groups=[_group_stats(group) for group in report.groups],
            users_in_several_groups=report.users_in_several_groups,
        )

    @maps_errors
    async def Backtest(
        self, request: rules_pb2.BacktestRequest, context: Context
    ) -> rules_pb2.BacktestResponse:
        """Replay a period's events through a definition, read-only, and report (no sends)."""
        workspace_id = await self._workspace(context)
        for name in ("definition", "from_time", "to_time"):
            if not request.HasField(name):
                raise InvalidArgumentError("is required", name)
        report = await backtest.run_backtest(
            self._pool,
            workspace_id,
            struct_to_dict(request.definition),
            request.from_time.ToDatetime(tzinfo=UTC),
            request.to_time.ToDatetime(tzinfo=UTC),
        )
        return _backtest_response(report)


BACKTEST_LISTED = 1000
"""At most this many users per group and would-be sends are listed in a Backtest response."""


def _optional_time(value: datetime | None) -> Any:
    return None if value is None else to_timestamp(value)


def _backtest_response(report: backtest.BacktestReport) -> rules_pb2.BacktestResponse:
    return rules_pb2.BacktestResponse(
        campaign_id=report.campaign_id,
        users=report.users,
        events=report.events,
        groups=[
            rules_pb2.BacktestGroup(
                group=group, users=users[:BACKTEST_LISTED], users_count=len(users)
            )
            for group, users in report.entered.items()
        ],
        entries=len(report.entries),
        sends=[
            rules_pb2.BacktestSend(
                user_id=send.user_id,
                trigger_event_id=send.trigger_event_id,
                group=send.group,
                branch=send.branch,
                channel=send.channel,
                due_at=to_timestamp(send.due_at),
                claimed_at=_optional_time(send.claimed_at),
                held_until=_optional_time(send.held_until),
                outcome=send.outcome,
                code=send.code,
                reason=send.reason,
            )
            for send in report.sends[:BACKTEST_LISTED]
        ],
        sends_count=len(report.sends),
        cancelled_by_exception=report.cancelled_by_exception,
        pending_at_end=report.pending_at_end,
        decision_counts=dict(report.decision_counts),
        outcomes=dict(report.outcomes),
        suppressed=dict(report.suppressed),
        frequency_caps=dict(report.frequency_caps),
        quiet_hours_holds=report.quiet_hours_holds,
    )
