"""A pure Python twin of the SQL trigger `dispatch_project_recipient` (migration 0006).

Dispatch reads a user's consent facts (subscriptions, time zone, undeliverable addresses) from
`recipient_preferences` and `undeliverable_addresses`, which the trigger keeps up to date as
events are appended. Those tables hold the facts as of *now*; a backtest needs them as of any
moment in the past, so it folds the user's events with this twin instead. A contract test
(tests/integration/rules/test_backtest.py) runs the trigger and the twin on the same events and
compares the results.

Stdlib only; folding never raises (like the trigger, which runs in ingest's group commit).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from services.dispatch.policy import CONSENT_CHANNELS, OPTED_IN, Recipient

IDENTIFY: Final = "$identify"
FAILED: Final = "message.failed"
_STATES: Final = ("opted_in", "subscribed", "unsubscribed")
_MAX_TIMEZONE_CHARS: Final = 64


def subscription_state(value: Any) -> str | None:
    """`dispatch_subscription_state`: absent or JSON null → None; booleans → subscribed /
    unsubscribed; one of the three states (trimmed of spaces, any case) → itself; anything else
    → `unsubscribed` (fail towards not sending)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "subscribed" if value else "unsubscribed"
    if isinstance(value, str):
        text = value.strip(" ").lower()
        if text in _STATES:
            return text
    return "unsubscribed"


def _as_text(value: Any) -> str | None:
    """Postgres `->>`: a string as is, JSON null as NULL, other values as their JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class RecipientFacts:
    """One user's rows of `recipient_preferences` (`exists`: the row exists) and
    `undeliverable_addresses` (channel → addresses)."""

    exists: bool = False
    subscriptions: Mapping[str, str | None] = field(default_factory=dict)
    timezone: str | None = None
    undeliverable: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def recipient(self) -> Recipient:
        """The policy view, as `dispatch.store.recipient` builds it."""
        subscriptions = (
            {channel: self.subscriptions.get(channel) for channel in CONSENT_CHANNELS}
            if self.exists
            else {}
        )
        return Recipient(subscriptions, self.timezone, dict(self.undeliverable))


def project_recipient(
    facts: RecipientFacts, name: str, properties: Mapping[str, Any] | Any
) -> RecipientFacts:
    """The facts after one appended event (the trigger's body, including its WHEN clause)."""
    if name == IDENTIFY:
        if not isinstance(properties, Mapping):
            return facts
        subscriptions = dict(facts.subscriptions)
        for channel in CONSENT_CHANNELS:
            key = f"{channel}_subscribe"
            if key in properties or not facts.exists:
                subscriptions[channel] = subscription_state(properties.get(key))
        timezone = facts.timezone
        if "timezone" in properties or not facts.exists:
            value = properties.get("timezone")
            timezone = value[:_MAX_TIMEZONE_CHARS] if isinstance(value, str) else None
        undeliverable = facts.undeliverable
        states = {subscription_state(properties.get(f"{c}_subscribe")) for c in CONSENT_CHANNELS}
        if OPTED_IN in states:
            undeliverable = {
                channel: addresses
                for channel, addresses in facts.undeliverable.items()
                if subscription_state(properties.get(f"{channel}_subscribe")) != OPTED_IN
            }
        return RecipientFacts(True, subscriptions, timezone, undeliverable)
    if name == FAILED and isinstance(properties, Mapping):
        address = properties.get("undeliverable_address")
        if not isinstance(address, str):
            return facts
        channel = _as_text(properties.get("channel")) or ""
        current = facts.undeliverable.get(channel, frozenset())
        if address in current:
            return facts
        return RecipientFacts(
            facts.exists,
            facts.subscriptions,
            facts.timezone,
            {**facts.undeliverable, channel: current | {address}},
        )
    return facts
