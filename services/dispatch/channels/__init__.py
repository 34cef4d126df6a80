"""Delivery channels for rendered messages."""

from services.dispatch.channels.base import (
    AmbiguousChannelError,
    Channel,
    ChannelError,
    Delivery,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
)

__all__ = [
    "AmbiguousChannelError",
    "Channel",
    "ChannelError",
    "Delivery",
    "OutboundMessage",
    "PermanentChannelError",
    "TransientChannelError",
]
