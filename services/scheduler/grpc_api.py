"""The SchedulerService servicer: translates protos to validated timer requests and back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
from opentelemetry import propagate

from nudge.grpcserver import InvalidArgumentError, NotFoundError, maps_errors
from nudge.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.application import Timers
from services.scheduler.domain import TimerRejectedError, parse_timer_id, validate_timer_request
from services.scheduler.messages import STATE_TO_PROTO, timer_to_proto

Context = grpc.aio.ServicerContext[Any, Any]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Schedule, Cancel and Get."""

    def __init__(self, timers: Timers) -> None:
        self._timers = timers

    @maps_errors
    async def Schedule(
        self, request: scheduler_pb2.ScheduleRequest, context: Context
    ) -> scheduler_pb2.ScheduleResponse:
        """Arm or re-arm a timer."""
        timer = request.timer
        try:
            checked = validate_timer_request(
                timer_id=timer.timer_id,
                workspace_id=timer.workspace_id,
                topic=timer.topic,
                due_at=_due_at(timer),
                payload=timer.payload,
                traceparent=timer.traceparent or _current_traceparent(),
            )
        except TimerRejectedError as error:
            raise InvalidArgumentError(error.reason, error.field) from None
        stored = await self._timers.schedule(checked)
        return scheduler_pb2.ScheduleResponse(timer=timer_to_proto(stored))

    @maps_errors
    async def Cancel(
        self, request: scheduler_pb2.CancelRequest, context: Context
    ) -> scheduler_pb2.CancelResponse:
        """Cancel a pending timer and report its state."""
        state = await self._timers.cancel(_timer_id(request.timer_id))
        return scheduler_pb2.CancelResponse(state=STATE_TO_PROTO[state])

    @maps_errors
    async def Get(
        self, request: scheduler_pb2.GetRequest, context: Context
    ) -> scheduler_pb2.GetResponse:
        """Return a timer."""
        timer_id = _timer_id(request.timer_id)
        stored = await self._timers.get(timer_id)
        if stored is None:
            raise NotFoundError(f"timer {timer_id} does not exist")
        return scheduler_pb2.GetResponse(timer=timer_to_proto(stored))


def _timer_id(value: str) -> uuid.UUID:
    try:
        return parse_timer_id(value)
    except TimerRejectedError as error:
        raise InvalidArgumentError(error.reason, error.field) from None


def _due_at(timer: scheduler_pb2.Timer) -> datetime | None:
    if not timer.HasField("due_at"):
        return None
    try:
        return timer.due_at.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgumentError("is out of range", "timer.due_at") from None


def _current_traceparent() -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")
