"""Pure dispatch policy: the retry schedule and ambiguous-outcome policy. Stdlib only."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

BASE_DELAY_S = 1.0
MAX_DELAY_S = 600.0


def retry_delay_s(attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
    """Delay before attempt `attempt + 1`: capped exponential backoff with full jitter, but never
    sooner than the provider's Retry-After."""
    ceiling = min(MAX_DELAY_S, BASE_DELAY_S * 2 ** max(attempt - 1, 0))
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


@dataclass(frozen=True)
class RetryDecision:
    """Retry at `next_at`, or give up (`next_at` None) because the window is exhausted."""

    next_at: datetime | None
    reason: str


def plan_retry(
    *,
    attempt: int,
    reason: str,
    retry_after_s: float | None,
    created_at: datetime,
    now: datetime,
    window: timedelta,
    rng: random.Random,
) -> RetryDecision:
    """Decide the next attempt of a transiently failed send."""
    next_at = now + timedelta(seconds=retry_delay_s(attempt, retry_after_s, rng))
    if next_at > created_at + window:
        return RetryDecision(
            None, f"retry window of {window} exhausted after {attempt} attempts: {reason}"
        )
    return RetryDecision(next_at, reason)


def ambiguous_is_retried(*, channel_is_idempotent: bool, kind: str) -> bool:
    """After "the provider may have accepted it": retry only where a retry cannot duplicate
    (the provider dedupes by our key), or for transactional mail (at-least-once policy)."""
    return channel_is_idempotent or kind == "transactional"
