"""The JetStream work-queue consumer that feeds send requests to the dispatcher."""

from __future__ import annotations

import asyncio
import logging
import uuid

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from nudge.bus import BusNames, fetch_available, redelivery_delay, work_queue_subscription
from nudge.dispatch.v1 import dispatch_pb2
from nudge.telemetry import consumer_span
from services.dispatch.application import Dispatcher

log = logging.getLogger("nudge.dispatch")
DURABLE = "dispatch"


async def consume_send_requests(
    js: JetStreamContext,
    names: BusNames,
    dispatcher: Dispatcher,
    *,
    batch: int = 64,
    ack_wait_s: float = 60.0,
) -> None:
    """Pull send requests forever; ack each once it is recorded as a planned send.

    From then on the `sends` table owns the work: the attempt runs in the background in its
    channel's bulkhead, and whatever a crash or a saturated channel leaves behind is found by the
    sweeper. So a slow provider never holds a fetched batch, and a batch never waits for it."""
    subject = f"{names.prefix}.dispatch.>"
    subscription = await work_queue_subscription(
        js, names.dispatch_stream, DURABLE, subject, ack_wait_s
    )
    while True:
        messages = await fetch_available(subscription, batch)
        await asyncio.gather(*(_handle(dispatcher, m) for m in messages))


async def _handle(dispatcher: Dispatcher, message: object) -> None:
    assert isinstance(message, Msg)
    headers = message.headers or {}
    with consumer_span(
        message.subject, headers, consumer_group=DURABLE, msg_id=headers.get("Nats-Msg-Id")
    ):
        await _process(dispatcher, message)


async def _process(dispatcher: Dispatcher, message: Msg) -> None:
    try:
        request = dispatch_pb2.SendRequest.FromString(message.data)
    except DecodeError:
        log.error("poison send request on %s: not a SendRequest; terminated", message.subject)
        await message.term()
        return
    problem = _invalid(request)
    if problem:
        log.error("poison send request on %s: %s; terminated", message.subject, problem)
        await message.term()
        return
    try:
        await dispatcher.record(request)
    except Exception:
        log.exception("send %s could not be recorded; will be redelivered", request.send_id)
        await message.nak(delay=redelivery_delay(message))
        return
    try:
        await message.ack_sync()
    except Exception as error:
        # Redelivered later and recorded again as a no-op; the send itself is safe.
        log.warning("ack of send %s failed: %r", request.send_id, error)
    dispatcher.submit(request.send_id, request.channel)


def _invalid(request: dispatch_pb2.SendRequest) -> str:
    try:
        uuid.UUID(request.send_id)
    except ValueError:
        return f"send_id {request.send_id[:64]!r} is not a UUID"
    for name in ("workspace_id", "user_id", "channel", "campaign_id"):
        if not getattr(request, name):
            return f"{name} is empty"
    return ""
