"""Scheduler settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nudge.config import ConfigError, env_address, env_float, env_int, env_str


@dataclass(frozen=True)
class Settings:
    """Everything the scheduler process needs to start."""

    address: str
    database_url: str
    nats_url: str
    nats_prefix: str
    batch_size: int
    max_idle_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read NUDGE_SCHEDULER_ADDR, DATABASE_URL, NATS_URL, NUDGE_NATS_PREFIX,
        NUDGE_SCHEDULER_BATCH and NUDGE_SCHEDULER_MAX_IDLE_S."""
        batch_size = env_int("NUDGE_SCHEDULER_BATCH", 100, env)
        if batch_size < 1:
            raise ConfigError("NUDGE_SCHEDULER_BATCH", f"must be at least 1, got {batch_size}")
        max_idle_s = env_float("NUDGE_SCHEDULER_MAX_IDLE_S", 1.0, env)
        if not max_idle_s > 0:
            raise ConfigError("NUDGE_SCHEDULER_MAX_IDLE_S", f"must be positive, got {max_idle_s}")
        return cls(
            address=env_address("NUDGE_SCHEDULER_ADDR", "127.0.0.1:50053", env),
            database_url=env_str("DATABASE_URL", None, env),
            nats_url=env_str("NATS_URL", None, env),
            nats_prefix=env_str("NUDGE_NATS_PREFIX", "nudge", env),
            batch_size=batch_size,
            max_idle_s=max_idle_s,
        )
