"""Ingest settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nudge.config import env_address, env_float, env_str


@dataclass(frozen=True)
class Settings:
    """Everything the ingest process needs to start."""

    address: str
    database_url: str
    nats_url: str
    nats_prefix: str
    rate_events_per_s: float
    rate_burst_events: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read NUDGE_INGEST_ADDR, DATABASE_URL, NATS_URL, NUDGE_NATS_PREFIX, rate limits."""
        return cls(
            address=env_address("NUDGE_INGEST_ADDR", "127.0.0.1:50051", env),
            database_url=env_str("DATABASE_URL", None, env),
            nats_url=env_str("NATS_URL", None, env),
            nats_prefix=env_str("NUDGE_NATS_PREFIX", "nudge", env),
            rate_events_per_s=env_float("NUDGE_INGEST_RATE_EVENTS_PER_S", 50_000.0, env),
            rate_burst_events=env_float("NUDGE_INGEST_RATE_BURST_EVENTS", 100_000.0, env),
        )
