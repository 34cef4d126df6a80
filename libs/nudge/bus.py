"""NATS JetStream: connection, the three streams, and publishing with trace context.

Postgres is the source of truth; NATS carries wake-ups and work items (RELIABILITY.md P2). Every
publish has a deterministic `Nats-Msg-Id`, and every stream a 10-minute duplicate window.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError
from opentelemetry import propagate

log = logging.getLogger("nudge.bus")

DUPLICATE_WINDOW_S = 600.0


@dataclass(frozen=True)
class BusNames:
    """Stream names and subjects under one prefix (tests use a unique prefix each)."""

    prefix: str = "nudge"

    @property
    def events_stream(self) -> str:
        """Stream of relayed events."""
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def timers_stream(self) -> str:
        """Work queue of fired timers."""
        return f"{self.prefix.upper()}_TIMERS"

    @property
    def dispatch_stream(self) -> str:
        """Work queue of send requests."""
        return f"{self.prefix.upper()}_DISPATCH"

    def events_subject(self, workspace_id: str) -> str:
        """Subject of a workspace's relayed events."""
        return f"{self.prefix}.events.{workspace_id}"

    def timers_subject(self, topic: str) -> str:
        """Subject fired timers of a topic are published on."""
        return f"{self.prefix}.timers.{topic}"

    def dispatch_subject(self, workspace_id: str, channel: str) -> str:
        """Subject of send requests."""
        return f"{self.prefix}.dispatch.{workspace_id}.{channel}"


async def connect(url: str, name: str) -> NatsClient:
    """Connect to NATS, retrying the initial connection and reconnecting forever."""
    return await nats.connect(
        url,
        name=name,
        connect_timeout=2,
        reconnect_time_wait=0.5,
        max_reconnect_attempts=-1,
        # nats-py 2.16 has no `retry_on_failed_connect`: with allow_reconnect and
        # max_reconnect_attempts < 0 its initial connect already retries until it succeeds.
        allow_reconnect=True,
    )


async def ensure_streams(js: JetStreamContext, names: BusNames) -> None:
    """Create or update the streams (idempotent; safe from several processes)."""
    configs = [
        StreamConfig(
            name=names.events_stream,
            subjects=[f"{names.prefix}.events.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=86400.0,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=names.timers_stream,
            subjects=[f"{names.prefix}.timers.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
        StreamConfig(
            name=names.dispatch_stream,
            subjects=[f"{names.prefix}.dispatch.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
    ]
    for config in configs:
        try:
            await js.stream_info(config.name or "")
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)


REDELIVERY_BACKOFF_S: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
"""NAK delays by delivery: the n-th failed delivery waits the n-th entry, then the last."""
REDELIVERY_ALERT_EVERY: Final = 10
"""A message failing this many deliveries (and each multiple) is logged at error level."""


def work_queue_consumer(durable: str, subject: str, ack_wait_s: float = 60.0) -> ConsumerConfig:
    """Config of a durable pull consumer shared by a service's replicas.

    Deliveries are unlimited. Every message on these streams is a unit of work whose loss would
    be silent (a send request, a fired timer): JetStream's MaxDeliver would drop it after a
    database outage of a few retries. The handlers terminate what can never succeed (poison: not
    decodable, invalid) and NAK the rest with `redelivery_delay`, so what remains is retried at
    most once a minute, and logged loudly (`REDELIVERY_ALERT_EVERY`), until it succeeds.
    """
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        # No BackOff list: JetStream would use its first entry as the ack wait of the first
        # delivery and redeliver work that is still running. Handlers pace retries with NAK delays.
        max_deliver=-1,
        max_ack_pending=1000,
    )


async def work_queue_subscription(
    js: JetStreamContext, stream: str, durable: str, subject: str, ack_wait_s: float = 60.0
) -> JetStreamContext.PullSubscription:
    """Pull from the durable work-queue consumer, creating it or updating its config first
    (`pull_subscribe` alone keeps the config of a consumer that exists, e.g. an older
    version's bounded MaxDeliver)."""
    await js.add_consumer(stream, work_queue_consumer(durable, subject, ack_wait_s))
    return await js.pull_subscribe(subject, durable=durable, stream=stream)


def redelivery_delay(message: Msg) -> float:
    """The NAK delay for a message whose handling failed (transiently) on this delivery."""
    delivered = max(1, message.metadata.num_delivered or 1)
    if delivered % REDELIVERY_ALERT_EVERY == 0:
        log.error(
            "message on %s failed %d deliveries; retrying (see the service's errors)",
            message.subject,
            delivered,
        )
    return REDELIVERY_BACKOFF_S[min(delivered, len(REDELIVERY_BACKOFF_S)) - 1]


def trace_headers(msg_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers for a publish: the dedupe id plus W3C trace context of the current span."""
    headers = {"Nats-Msg-Id": msg_id, **(extra or {})}
    propagate.inject(headers)
    return headers


async def fetch_available(
    subscription: JetStreamContext.PullSubscription, batch: int, idle_timeout_s: float = 1.0
) -> list[Msg]:
    """The next message (waiting up to `idle_timeout_s`) plus whatever else is already there.

    Not `fetch(batch, timeout)` on its own: on an idle stream that leaves a lingering pull for
    `batch` messages, and nats-py returns the first one only when the pull expires, so a lone
    message waited up to the whole timeout (dispatch p90 of ~0.5 s on an idle stack). A pull
    for ONE message returns the moment it arrives; the second, short fetch then drains what
    has accumulated without lingering. Returns [] when nothing arrived in time.
    """
    try:
        messages = await subscription.fetch(1, timeout=idle_timeout_s)
    except TimeoutError:  # nats-py's TimeoutError or a bare asyncio one (ECOSYSTEM §8.6)
        return []
    if batch > 1:
        with contextlib.suppress(TimeoutError):
            messages += await subscription.fetch(batch - 1, timeout=0.005)
    return messages
