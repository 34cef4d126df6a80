"""Rules settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nudge.config import env_address, env_float, env_int, env_str


@dataclass(frozen=True)
class Settings:
    """Everything the rules process needs to start."""

    address: str
    database_url: str
    nats_url: str
    nats_prefix: str
    scheduler_address: str
    batch_size: int
    ack_wait_s: float
    fire_margin_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read NUDGE_RULES_ADDR, DATABASE_URL, NATS_URL, NUDGE_NATS_PREFIX,
        NUDGE_SCHEDULER_ADDR, NUDGE_RULES_BATCH, NUDGE_RULES_ACK_WAIT_S,
        NUDGE_RULES_FIRE_MARGIN_S (how long after an instance's due time its timer fires, so
        that the re-check sees every event received before the due time; default 5)."""
        return cls(
            address=env_address("NUDGE_RULES_ADDR", "127.0.0.1:50052", env),
            database_url=env_str("DATABASE_URL", None, env),
            nats_url=env_str("NATS_URL", None, env),
            nats_prefix=env_str("NUDGE_NATS_PREFIX", "nudge", env),
            scheduler_address=env_address("NUDGE_SCHEDULER_ADDR", "127.0.0.1:50053", env),
            batch_size=env_int("NUDGE_RULES_BATCH", 1000, env),
            ack_wait_s=env_float("NUDGE_RULES_ACK_WAIT_S", 60.0, env),
            fire_margin_s=env_float("NUDGE_RULES_FIRE_MARGIN_S", 0.0, env),
        )
