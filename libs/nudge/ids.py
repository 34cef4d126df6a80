"""Deterministic identifiers: uuid5 over the parts of the cause, so replays are no-ops."""

from __future__ import annotations

import uuid

NUDGE_NAMESPACE = uuid.UUID("6f1d8a8e-3c1b-5b7e-9a55-6e75646765a1")


def deterministic_id(kind: str, *parts: object) -> uuid.UUID:
    """Return uuid5(kind | part1 | part2 ...). `|` inside parts is escaped, so ids never collide."""
    escaped = (str(p).replace("\\", "\\\\").replace("|", "\\|") for p in parts)
    return uuid.uuid5(NUDGE_NAMESPACE, "|".join([kind, *escaped]))
