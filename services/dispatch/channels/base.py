"""The channel contract: a rendered message in, a delivery or a classified error out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class OutboundMessage:
    send_id: str
    workspace_id: str
    user_id: str
    channel: str
    fields: Mapping[str, str]
    traceparent: str | None = None
    # One-click unsubscribe URL (RFC 8058) for marketing email; None for everything else.
    unsubscribe_url: str | None = None


@dataclass(frozen=True)
class Delivery:
    provider_message_id: str | None
    detail: str = ""


class ChannelError(Exception):
    """A send that did not (provably) succeed, classified for the retry policy."""

    retryable: bool = False

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        if retryable is not None:
            self.retryable = retryable
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.reason!r}, retryable={self.retryable}, "
            f"retry_after_s={self.retry_after_s})"
        )


class TransientChannelError(ChannelError):
    """The provider did not accept the message; trying again later may succeed."""

    retryable = True


class PermanentChannelError(ChannelError):
    """The provider refused the message (or we refused to send it); retrying cannot help."""

    retryable = False


class UndeliverableAddressError(PermanentChannelError):
    """The provider says the address does not exist (SMTP 5.1.x hard bounce, an unregistered
    push token): permanent, and dispatch records `address` so no later send goes to it."""

    def __init__(self, reason: str, *, address: str) -> None:
        super().__init__(reason)
        self.address = address


class AmbiguousChannelError(ChannelError):
    """The request may have reached the provider, but no answer came back.

    `retryable` is True only when the channel passes the send id as an idempotency key the
    provider honours; otherwise a retry may deliver twice and the caller's policy decides.
    """

    def __init__(self, reason: str, *, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(reason, retryable=retryable, retry_after_s=retry_after_s)


class Channel(Protocol):
    name: str
    supports_idempotency: bool

    async def send(self, msg: OutboundMessage) -> Delivery: ...

    async def aclose(self) -> None: ...
