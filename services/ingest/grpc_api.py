"""The IngestService servicer: translates protos to validated events and outcomes back."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import grpc
from opentelemetry import trace

from nudge import metrics
from nudge.auth import KeyVerifier
from nudge.eventstore import NewEvent
from nudge.grpcserver import InvalidArgumentError, ResourceExhaustedError, bearer, maps_errors
from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.logs import WORKSPACE_ATTRIBUTE
from nudge.protoconv import struct_to_dict, timestamp_or_none
from nudge.telemetry import current_traceparent
from services.ingest.application import GroupCommitter, Outcome, RateLimiter
from services.ingest.domain import MAX_EVENTS_PER_BATCH, EventRejectedError, validate_event

IDENTIFY_EVENT = "$identify"
Context = grpc.aio.ServicerContext[Any, Any]

_STATUS = {
    Outcome.ACCEPTED: ingest_pb2.EVENT_STATUS_ACCEPTED,
    Outcome.DUPLICATE: ingest_pb2.EVENT_STATUS_DUPLICATE,
    Outcome.CONFLICT: ingest_pb2.EVENT_STATUS_REJECTED,
}
_OUTCOME_NAMES = {
    ingest_pb2.EVENT_STATUS_ACCEPTED: "accepted",
    ingest_pb2.EVENT_STATUS_DUPLICATE: "duplicate",
    ingest_pb2.EVENT_STATUS_REJECTED: "rejected",
}
_CONFLICT_REASON = "event_id was already used for an event with a different body"


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Track and Identify."""

    def __init__(
        self,
        verifier: KeyVerifier,
        committer: GroupCommitter,
        limiter: RateLimiter,
        clock: Any,
    ) -> None:
        self._verifier = verifier
        self._committer = committer
        self._limiter = limiter
        self._clock = clock

    @maps_errors
    async def Track(
        self, request: ingest_pb2.TrackRequest, context: Context
    ) -> ingest_pb2.TrackResponse:
        """Append a batch of events."""
        principal = await self._verifier.verify(bearer(context))
        principal.require("track")
        trace.get_current_span().set_attribute(WORKSPACE_ATTRIBUTE, principal.workspace_id)
        count = len(request.events)
        if count == 0:
            raise InvalidArgumentError("at least one event is required", "events")
        if count > MAX_EVENTS_PER_BATCH:
            raise InvalidArgumentError(f"at most {MAX_EVENTS_PER_BATCH} events", "events")
        self._admit(principal.workspace_id, count)
        now: datetime = await self._clock()
        results: list[ingest_pb2.EventResult | None] = []
        valid: list[NewEvent] = []
        metadata = _metadata(context)
        for index, event in enumerate(request.events):
            try:
                checked = validate_event(
                    event_id=event.event_id,
                    user_id=event.user_id,
                    name=event.name,
                    occurred_at=timestamp_or_none(event.occurred_at, event.HasField("occurred_at")),
                    properties=struct_to_dict(event.properties),
                    context=struct_to_dict(event.context),
                    now=now,
                    field=f"events[{index}]",
                )
            except EventRejectedError as error:
                results.append(_rejected(event.event_id, error))
                continue
            results.append(None)
            valid.append(
                NewEvent(
                    workspace_id=principal.workspace_id,
                    event_id=checked.event_id,
                    user_id=checked.user_id,
                    name=checked.name,
                    occurred_at=checked.occurred_at,
                    properties=checked.properties,
                    context=checked.context,
                    metadata=metadata,
                )
            )
        outcomes = iter(await self._committer.append(valid))
        stored = iter(valid)
        response = ingest_pb2.TrackResponse()
        for result in results:
            if result is None:
                result = _result(next(stored).event_id, next(outcomes))
            response.results.append(result)
        metrics.count_ingested(_OUTCOME_NAMES[r.status] for r in response.results)
        return response

    @maps_errors
    async def Identify(
        self, request: ingest_pb2.IdentifyRequest, context: Context
    ) -> ingest_pb2.IdentifyResponse:
        """Record user traits as an `$identify` event."""
        principal = await self._verifier.verify(bearer(context))
        principal.require("track")
        trace.get_current_span().set_attribute(WORKSPACE_ATTRIBUTE, principal.workspace_id)
        self._admit(principal.workspace_id, 1)
        now: datetime = await self._clock()
        event_id = request.event_id or f"identify-{uuid.uuid4()}"
        try:
            checked = validate_event(
                event_id=event_id,
                user_id=request.user_id,
                name=IDENTIFY_EVENT,
                occurred_at=timestamp_or_none(request.occurred_at, request.HasField("occurred_at")),
                properties=struct_to_dict(request.traits),
                context={},
                now=now,
                field="identify",
                allow_reserved_name=True,
            )
        except EventRejectedError as error:
            raise InvalidArgumentError(error.reason, error.field) from None
        event = NewEvent(
            workspace_id=principal.workspace_id,
            event_id=checked.event_id,
            user_id=checked.user_id,
            name=IDENTIFY_EVENT,
            occurred_at=checked.occurred_at,
            properties=checked.properties,
            context={},
            metadata=_metadata(context),
        )
        [outcome] = await self._committer.append([event])
        result = _result(event.event_id, outcome)
        metrics.count_ingested([_OUTCOME_NAMES[result.status]])
        return ingest_pb2.IdentifyResponse(result=result)

    def _admit(self, workspace_id: str, events: int) -> None:
        wait_s = self._limiter.admit(workspace_id, events)
        if wait_s is not None:
            raise ResourceExhaustedError(
                f"rate limit exceeded for this workspace; retry in {wait_s:.2f}s"
            )


def _metadata(context: Context) -> dict[str, Any]:
    # The caller's trace travels with the event (STYLE.md habit 10): the relay, the rules
    # projection and the sends it plans link to it or continue it.
    traceparent = current_traceparent()
    return {"traceparent": traceparent} if traceparent else {}


def _rejected(event_id: str, error: EventRejectedError) -> ingest_pb2.EventResult:
    return ingest_pb2.EventResult(
        event_id=event_id,
        status=ingest_pb2.EVENT_STATUS_REJECTED,
        reason=error.reason,
        field=error.field,
    )


def _result(event_id: str, outcome: Outcome) -> ingest_pb2.EventResult:
    return ingest_pb2.EventResult(
        event_id=event_id,
        status=_STATUS[outcome],
        reason=_CONFLICT_REASON if outcome is Outcome.CONFLICT else "",
    )
