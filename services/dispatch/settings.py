"""Dispatch settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nudge.config import env_address, env_float, env_str


@dataclass(frozen=True)
class Settings:
    """Everything the dispatch process needs to start."""

    address: str
    database_url: str
    nats_url: str
    nats_prefix: str
    smtp_url: str
    email_from: str
    webhook_secret: str
    webhook_allow_hosts: tuple[str, ...]
    lease_s: float
    ack_wait_s: float
    retry_window_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read NUDGE_DISPATCH_ADDR, DATABASE_URL, NATS_URL, NUDGE_SMTP_URL, NUDGE_EMAIL_FROM,
        NUDGE_WEBHOOK_SECRET, NUDGE_WEBHOOK_ALLOW_HOSTS, NUDGE_DISPATCH_LEASE_S,
        NUDGE_DISPATCH_ACK_WAIT_S, NUDGE_RETRY_WINDOW_S."""
        allow = env_str("NUDGE_WEBHOOK_ALLOW_HOSTS", "-", env)
        return cls(
            address=env_address("NUDGE_DISPATCH_ADDR", "127.0.0.1:50054", env),
            database_url=env_str("DATABASE_URL", None, env),
            nats_url=env_str("NATS_URL", None, env),
            nats_prefix=env_str("NUDGE_NATS_PREFIX", "nudge", env),
            smtp_url=env_str("NUDGE_SMTP_URL", "smtp://127.0.0.1:2525", env),
            email_from=env_str("NUDGE_EMAIL_FROM", "Nudge <nudge@localhost>", env),
            webhook_secret=env_str("NUDGE_WEBHOOK_SECRET", None, env),
            webhook_allow_hosts=tuple(h for h in allow.split(",") if h and h != "-"),
            lease_s=env_float("NUDGE_DISPATCH_LEASE_S", 60.0, env),
            ack_wait_s=env_float("NUDGE_DISPATCH_ACK_WAIT_S", 60.0, env),
            retry_window_s=env_float("NUDGE_RETRY_WINDOW_S", 86400.0, env),
        )
