"""A channel that prints each rendered message as one JSON line (development, demos)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from services.dispatch.channels.base import Delivery, OutboundMessage


class ConsoleChannel:
    name = "console"
    supports_idempotency = True

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    async def send(self, msg: OutboundMessage) -> Delivery:
        line = json.dumps(
            {
                "send_id": msg.send_id,
                "workspace_id": msg.workspace_id,
                "user_id": msg.user_id,
                "channel": msg.channel,
                "fields": dict(msg.fields),
                "traceparent": msg.traceparent,
            },
            ensure_ascii=False,
            sort_keys=True,
        )
        stream = self._stream if self._stream is not None else sys.stdout
        stream.write(line + "\n")
        stream.flush()
        return Delivery(provider_message_id=msg.send_id, detail="printed")

    async def aclose(self) -> None:
        return None
