"""Timers as protobuf messages (the gRPC API and the TimerFired payload share them)."""

from __future__ import annotations

from nudge.protoconv import to_timestamp
from nudge.scheduler.v1 import scheduler_pb2
from services.scheduler.domain import Timer, TimerState
from services.scheduler.store import FiringSnapshot

STATE_TO_PROTO = {
    None: scheduler_pb2.TIMER_STATE_UNSPECIFIED,
    TimerState.PENDING: scheduler_pb2.TIMER_STATE_PENDING,
    TimerState.FIRED: scheduler_pb2.TIMER_STATE_FIRED,
    TimerState.CANCELLED: scheduler_pb2.TIMER_STATE_CANCELLED,
}


def timer_to_proto(timer: Timer) -> scheduler_pb2.Timer:
    """A stored timer as a Timer message."""
    return scheduler_pb2.Timer(
        timer_id=str(timer.timer_id),
        workspace_id=timer.workspace_id,
        topic=timer.topic,
        due_at=to_timestamp(timer.due_at),
        payload=timer.payload,
        state=STATE_TO_PROTO[timer.state],
        version=timer.version,
        traceparent=timer.traceparent,
    )


def timer_fired(timer: Timer, snapshot: FiringSnapshot) -> scheduler_pb2.TimerFired:
    """The message published when `timer` fires in the transaction of `snapshot`."""
    message = scheduler_pb2.TimerFired(
        timer=timer_to_proto(timer),
        fired_at=to_timestamp(snapshot.fired_at),
        snapshot_xmax=snapshot.xmax,
    )
    message.timer.state = scheduler_pb2.TIMER_STATE_FIRED
    return message
