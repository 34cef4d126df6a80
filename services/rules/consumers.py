"""NATS consumers of the rules service: event wake-ups and fired timers."""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from nudge.bus import BusNames, fetch_available, redelivery_delay, work_queue_subscription
from nudge.runtime import sleep_or_wake
from nudge.scheduler.v1 import scheduler_pb2
from nudge.telemetry import consumer_span
from services.rules.application import TIMER_TOPIC, Projector, TimerHandler

log = logging.getLogger("nudge.rules")
TIMERS_DURABLE = "rules-timers"


async def project_forever(
    projector: Projector, wake: asyncio.Event, idle_poll_s: float = 1.0
) -> None:
    """Apply batches while there are events; otherwise wait for a wake-up or the poll interval.

    NATS only wakes the projector; completeness comes from the store cursor, so a lost wake-up
    costs at most `idle_poll_s` of latency.
    """
    while True:
        try:
            applied = await projector.apply_once()
        except (OSError, ConnectionError) as error:
            log.warning("projection batch failed (%r); retrying", error)
            await asyncio.sleep(0.5)
            continue
        if applied == 0:
            await sleep_or_wake(wake, idle_poll_s)


async def subscribe_wakeups(nc: NatsClient, names: BusNames, wake: asyncio.Event) -> None:
    """Set `wake` on every relayed event batch (a core subscription: no acks, no state)."""

    async def on_message(message: Msg) -> None:
        with consumer_span(message.subject, message.headers, consumer_group="rules-wakeup"):
            wake.set()

    await nc.subscribe(f"{names.prefix}.events.>", cb=on_message)


async def consume_fired_timers(
    js: JetStreamContext,
    names: BusNames,
    handler: TimerHandler,
    *,
    batch: int = 64,
    ack_wait_s: float = 60.0,
) -> None:
    """Handle fired timers forever; ack after the effect commits (inbox makes repeats no-ops)."""
    subject = names.timers_subject(TIMER_TOPIC)
    subscription = await work_queue_subscription(
        js, names.timers_stream, TIMERS_DURABLE, subject, ack_wait_s
    )
    while True:
        for message in await fetch_available(subscription, batch):
            headers = message.headers or {}
            with consumer_span(
                message.subject,
                headers,
                consumer_group=TIMERS_DURABLE,
                msg_id=headers.get("Nats-Msg-Id"),
            ):
                await _handle_fired(handler, message)


async def _handle_fired(handler: TimerHandler, message: Msg) -> None:
    try:
        fired = scheduler_pb2.TimerFired.FromString(message.data)
    except DecodeError:
        log.error("poison message on %s: not a TimerFired; terminated", message.subject)
        await message.term()
        return
    if not await handler.wait_for_projection(fired.snapshot_xmax):
        log.warning("projection behind timer %s's watermark; redelivering", fired.timer.timer_id)
        await message.nak(delay=redelivery_delay(message))
        return
    try:
        await handler.handle(fired)
    except Exception:
        log.exception("fired timer %s failed; will be redelivered", fired.timer.timer_id)
        await message.nak(delay=redelivery_delay(message))
        return
    await message.ack_sync()
