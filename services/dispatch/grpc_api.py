"""The DispatchService servicer: what was sent to a user and why not, the workspace delivery
policy, dead letters, and previews. Translation only; the work is in application.py."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc

from nudge.auth import KeyVerifier
from nudge.dispatch.v1 import dispatch_pb2, dispatch_pb2_grpc
from nudge.grpcserver import InvalidArgumentError, NotFoundError, bearer, maps_errors
from nudge.protoconv import struct_to_dict, to_timestamp
from services.dispatch import application, store
from services.dispatch.policy import CHANNELS, PolicyError, WorkspacePolicy

Context = grpc.aio.ServicerContext[Any, Any]


def _limit(value: int, default: int = 100) -> int:
    limit = value or default
    if not 0 < limit <= 1000:
        raise InvalidArgumentError("must be between 1 and 1000", "limit")
    return limit


def policy_message(policy: WorkspacePolicy, version: int) -> dispatch_pb2.WorkspacePolicy:
    """The proto form of a policy."""
    message = dispatch_pb2.WorkspacePolicy(
        default_timezone=policy.default_timezone,
        frequency_caps=[
            dispatch_pb2.FrequencyCap(channel=cap.channel, max=cap.max, per=str(cap.per))
            for cap in policy.frequency_caps
        ],
        require_opt_in=sorted(policy.require_opt_in),
        version=version,
    )
    if policy.global_control is not None:
        message.global_control.CopyFrom(
            dispatch_pb2.GlobalControl(
                percent=policy.global_control.percent, salt=policy.global_control.salt
            )
        )
    if policy.quiet_hours is not None:
        message.quiet_hours.CopyFrom(
            dispatch_pb2.QuietHours(
                start=policy.quiet_hours.start.strftime("%H:%M"),
                end=policy.quiet_hours.end.strftime("%H:%M"),
                channels=sorted(policy.quiet_hours.channels),
            )
        )
    return message


class DispatchServicer(dispatch_pb2_grpc.DispatchServiceServicer):
    """ListMessages, workspace policy, dead letters, PreviewMessage."""

    def __init__(self, pool: asyncpg.Pool, verifier: KeyVerifier) -> None:
        self._pool = pool
        self._verifier = verifier

    async def _workspace(self, context: Context) -> str:
        principal = await self._verifier.verify(bearer(context))
        principal.require("admin")
        return principal.workspace_id

    @maps_errors
    async def ListMessages(
        self, request: dispatch_pb2.ListMessagesRequest, context: Context
    ) -> dispatch_pb2.ListMessagesResponse:
        """A user's messages, newest first."""
        workspace_id = await self._workspace(context)
        if not request.user_id:
            raise InvalidArgumentError("is required", "user_id")
        limit = _limit(request.limit)
        rows = await store.list_messages(self._pool, workspace_id, request.user_id, limit)
        response = dispatch_pb2.ListMessagesResponse()
        for row in rows:
            message = response.messages.add(
                send_id=row["send_id"],
                campaign_id=row["campaign_id"],
                channel=row["channel"],
                state=row["state"],
                reason=row["reason"],
                attempts=row["attempts"],
                ambiguous_attempts=row["ambiguous_attempts"],
            )
            message.created_at.CopyFrom(to_timestamp(row["created_at"]))
            if row["sent_at"] is not None:
                message.sent_at.CopyFrom(to_timestamp(row["sent_at"]))
            if row["next_at"] is not None:
                message.next_at.CopyFrom(to_timestamp(row["next_at"]))
        return response

    @maps_errors
    async def ApplyWorkspacePolicy(
        self, request: dispatch_pb2.ApplyWorkspacePolicyRequest, context: Context
    ) -> dispatch_pb2.ApplyWorkspacePolicyResponse:
        """Validate and store the workspace policy."""
        workspace_id = await self._workspace(context)
        try:
            applied = await application.apply_policy(
                self._pool, workspace_id, struct_to_dict(request.policy)
            )
        except PolicyError as error:
            raise InvalidArgumentError(error.message, error.path) from None
        return dispatch_pb2.ApplyWorkspacePolicyResponse(
            policy=policy_message(applied.policy, applied.version), changed=applied.changed
        )

    @maps_errors
    async def GetWorkspacePolicy(
        self, request: dispatch_pb2.GetWorkspacePolicyRequest, context: Context
    ) -> dispatch_pb2.GetWorkspacePolicyResponse:
        """The policy in force."""
        workspace_id = await self._workspace(context)
        policy, version = await application.current_policy(self._pool, workspace_id)
        return dispatch_pb2.GetWorkspacePolicyResponse(policy=policy_message(policy, version))

    @maps_errors
    async def ListDeadLetters(
        self, request: dispatch_pb2.ListDeadLettersRequest, context: Context
    ) -> dispatch_pb2.ListDeadLettersResponse:
        """Dead letters, newest first."""
        workspace_id = await self._workspace(context)
        rows = await store.list_dead_letters(
            self._pool, workspace_id, _limit(request.limit), request.include_replayed
        )
        response = dispatch_pb2.ListDeadLettersResponse()
        for row in rows:
            item = response.dead_letters.add(
                dead_letter_id=row["dead_letter_id"],
                send_id=row["send_id"],
                user_id=row["user_id"],
                campaign_id=row["campaign_id"],
                channel=row["channel"],
                reason=row["reason"],
                attempts=row["attempts"],
                state=row["state"],
            )
            item.created_at.CopyFrom(to_timestamp(row["created_at"]))
            if row["replayed_at"] is not None:
                item.replayed_at.CopyFrom(to_timestamp(row["replayed_at"]))
        return response

    @maps_errors
    async def ReplayDeadLetter(
        self, request: dispatch_pb2.ReplayDeadLetterRequest, context: Context
    ) -> dispatch_pb2.ReplayDeadLetterResponse:
        """Replay a dead letter under its send id."""
        workspace_id = await self._workspace(context)
        async with self._pool.acquire() as conn, conn.transaction():
            replay = await store.replay_dead_letter(conn, workspace_id, request.dead_letter_id)
        if replay is None:
            raise NotFoundError(f"no dead letter {request.dead_letter_id}")
        return dispatch_pb2.ReplayDeadLetterResponse(
            send_id=replay.send_id, replayed=replay.replayed, state=replay.state
        )

    @maps_errors
    async def PreviewMessage(
        self, request: dispatch_pb2.PreviewMessageRequest, context: Context
    ) -> dispatch_pb2.PreviewMessageResponse:
        """Render without sending; report the policy verdict."""
        workspace_id = await self._workspace(context)
        if not request.user_id:
            raise InvalidArgumentError("is required", "user_id")
        if request.channel not in CHANNELS:
            raise InvalidArgumentError(f"must be one of {', '.join(CHANNELS)}", "channel")
        if request.kind not in ("", *application.KINDS):
            raise InvalidArgumentError("must be marketing or transactional", "kind")
        if not request.template:
            raise InvalidArgumentError("is required", "template")
        result = await application.preview(
            self._pool,
            workspace_id=workspace_id,
            user_id=request.user_id,
            channel=request.channel,
            kind=request.kind or "marketing",
            template=dict(request.template),
            context=struct_to_dict(request.context),
        )
        response = dispatch_pb2.PreviewMessageResponse(
            fields=result.fields,
            error=result.error,
            error_field=result.error_field,
            verdict=result.verdict,
            reason=result.reason,
        )
        if result.hold_until is not None:
            response.hold_until.CopyFrom(to_timestamp(result.hold_until))
        return response
