"""A channel wrapped with its provider request's CLIENT span and metrics.

Every channel gets the same treatment in the composition root, so the channels themselves stay
free of telemetry: the span is the provider request of the trace (a child of the send being
processed), its context goes to webhook receivers as `traceparent`, and its duration and result
feed the provider metrics. Attributes carry the channel and send id only, never addresses or
rendered content.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from nudge import metrics, telemetry
from nudge.logs import WORKSPACE_ATTRIBUTE
from services.dispatch.channels.base import (
    AmbiguousChannelError,
    Channel,
    ChannelError,
    Delivery,
    OutboundMessage,
)

_SPAN_NAMES = {"email": "smtp send", "webhook": "POST"}


def _result(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, AmbiguousChannelError):
        return "ambiguous"
    if isinstance(error, ChannelError):
        return "transient" if error.retryable else "permanent"
    return "error"


class InstrumentedChannel:
    """Delegates to `inner`; `send` runs inside a CLIENT span and is timed and counted."""

    def __init__(self, inner: Channel) -> None:
        self._inner = inner
        self.name = inner.name
        self.supports_idempotency = inner.supports_idempotency

    async def send(self, msg: OutboundMessage) -> Delivery:
        """Send through the wrapped channel."""
        with telemetry.tracer().start_as_current_span(
            _SPAN_NAMES.get(self.name, f"{self.name} send"),
            kind=SpanKind.CLIENT,
            attributes={
                "nudge.channel": self.name,
                "nudge.send_id": msg.send_id,
                WORKSPACE_ATTRIBUTE: msg.workspace_id,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            traced = dataclasses.replace(msg, traceparent=telemetry.current_traceparent() or None)
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                return await self._inner.send(traced)
            except BaseException as raised:
                error = raised
                raise
            finally:
                metrics.PROVIDER_SECONDS.labels(self.name).observe(time.perf_counter() - started)
                result = _result(error)
                metrics.PROVIDER_REQUESTS.labels(self.name, result).inc()
                span.set_attribute("nudge.result", result)
                if error is not None:
                    # The class only: provider replies can quote the recipient address.
                    span.set_status(Status(StatusCode.ERROR, type(error).__name__))

    async def aclose(self) -> None:
        """Close the wrapped channel."""
        await self._inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def instrumented(channels: dict[str, Channel]) -> dict[str, Channel]:
    """Every channel wrapped."""
    return {name: InstrumentedChannel(channel) for name, channel in channels.items()}
