"""The DispatchService servicer: what was sent to a user, and why not."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc

from nudge.auth import KeyVerifier
from nudge.dispatch.v1 import dispatch_pb2, dispatch_pb2_grpc
from nudge.grpcserver import InvalidArgumentError, bearer, maps_errors
from nudge.protoconv import to_timestamp
from services.dispatch import store

Context = grpc.aio.ServicerContext[Any, Any]


class DispatchServicer(dispatch_pb2_grpc.DispatchServiceServicer):
    """ListMessages."""

    def __init__(self, pool: asyncpg.Pool, verifier: KeyVerifier) -> None:
        self._pool = pool
        self._verifier = verifier

    @maps_errors
    async def ListMessages(
        self, request: dispatch_pb2.ListMessagesRequest, context: Context
    ) -> dispatch_pb2.ListMessagesResponse:
        """A user's messages, newest first."""
        principal = await self._verifier.verify(bearer(context))
        principal.require("admin")
        if not request.user_id:
            raise InvalidArgumentError("is required", "user_id")
        limit = request.limit or 100
        if not 0 < limit <= 1000:
            raise InvalidArgumentError("must be between 1 and 1000", "limit")
        rows = await store.list_messages(self._pool, principal.workspace_id, request.user_id, limit)
        response = dispatch_pb2.ListMessagesResponse()
        for row in rows:
            message = response.messages.add(
                send_id=row["send_id"],
                campaign_id=row["campaign_id"],
                channel=row["channel"],
                state=row["state"],
                reason=row["reason"],
                attempts=row["attempts"],
            )
            message.created_at.CopyFrom(to_timestamp(row["created_at"]))
            if row["sent_at"] is not None:
                message.sent_at.CopyFrom(to_timestamp(row["sent_at"]))
        return response
