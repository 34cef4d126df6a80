"""Delivery channels for rendered messages."""

from services.dispatch.channels.base import (
    AmbiguousChannelError,
    Channel,
    ChannelError,
    Delivery,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
    UndeliverableAddressError,
)

__all__ = [
    "AmbiguousChannelError",
    "Channel",
    "ChannelError",
    "Delivery",
    "OutboundMessage",
    "PermanentChannelError",
    "TransientChannelError",
    "UndeliverableAddressError",
]
