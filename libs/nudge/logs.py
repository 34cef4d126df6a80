"""Logging: JSON lines (one object per line) or human-readable, chosen by NUDGE_LOG_FORMAT."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

from opentelemetry import trace

WORKSPACE_ATTRIBUTE = "nudge.workspace_id"
"""Span attribute naming the workspace an operation works for; logs inside it carry it too."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line with service, the current trace/span ids and the workspace of
    the current span (its `nudge.workspace_id` attribute) when it has one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render one record."""
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = trace.get_current_span()
        span = current.get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        workspace = (getattr(current, "attributes", None) or {}).get(WORKSPACE_ATTRIBUTE)
        if workspace:
            entry["workspace"] = workspace
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(service: str) -> None:
    """Configure the root logger once for a service process."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("NUDGE_LOG_FORMAT", "json") == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service:<9} %(levelname)-5s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("NUDGE_LOG_LEVEL", "INFO").upper())
