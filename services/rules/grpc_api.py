"""The RulesService servicer: campaigns as code, and users' engagement state."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc

from nudge.auth import KeyVerifier
from nudge.grpcserver import InvalidArgumentError, NotFoundError, bearer, maps_errors
from nudge.protoconv import dict_to_struct, struct_to_dict, to_timestamp
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc
from services.rules import explain, replay, store
from services.rules.application import CampaignAdmin, UserViews

Context = grpc.aio.ServicerContext[Any, Any]


def _campaign(version: store.CampaignVersion) -> rules_pb2.Campaign:
    return rules_pb2.Campaign(
        campaign_id=version.campaign_id,
        version=version.version,
        definition=dict_to_struct(version.definition),
        created_at=to_timestamp(version.created_at),
        status=version.status,
    )


class RulesServicer(rules_pb2_grpc.RulesServiceServicer):
    """ApplyCampaign, GetCampaign, ListCampaigns, GetUser, PauseCampaign, ResumeCampaign,
    ExplainDecisions, VerifyProjection."""

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
            mismatches=[
                rules_pb2.UserMismatch(user_id=m.user_id, problem=m.problem, fields=m.fields)
                for m in report.mismatches
            ],
        )
