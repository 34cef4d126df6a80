"""The order-shipped use case as a push: action trigger + property filter + personalization,
delivered to a real HTTP/2 FCM peer and to a real APNs peer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from nudge.testing.provider_peers import APNS, FCM, ProviderPeers, apns_error
from tests.e2e.conftest import Stack
from tests.e2e.test_walking_skeleton import _apply, _event, _identify, _track

pytestmark = pytest.mark.e2e
APNS_TOKEN = "ab" * 32


@pytest.fixture
def peers() -> Iterator[ProviderPeers]:
    with ProviderPeers() as running:
        yield running


@pytest.fixture
def stack_env(peers: ProviderPeers) -> dict[str, str]:
    return peers.env()


async def test_order_shipped_push_reaches_fcm_and_apns_only_for_orders_over_20(
    stack: Stack, peers: ProviderPeers
) -> None:
    await _apply(stack, "order-shipped-push.yaml")
    await _identify(stack, "ada", {"first_name": "Ada", "push_token": "fcm-token-ada"})
    await _identify(stack, "tim", {"push_token": APNS_TOKEN})
    await _track(
        stack,
        _event("ada", "order_shipped", order_id="A-1", total=42, eta="Monday"),
        _event("ada", "order_shipped", order_id="A-2", total=5, eta="never"),
        _event("tim", "order_shipped", order_id="T-1", total=99, eta="Friday"),
    )

    received = await asyncio.to_thread(peers.wait_for, 2, None, 20.0)
    [fcm] = [r for r in received if r.provider == FCM]
    [apns] = [r for r in received if r.provider == APNS]
    assert fcm.json()["message"]["token"] == "fcm-token-ada"
    assert fcm.json()["message"]["notification"] == {
        "title": "Order A-1 shipped",
        "body": "Hi Ada, it arrives Monday.",
    }
    assert apns.http_version == "2"
    assert apns.path == f"/3/device/{APNS_TOKEN}"
    assert apns.json()["aps"]["alert"] == {
        "title": "Order T-1 shipped",
        "body": "Hi there, it arrives Friday.",
    }
    await asyncio.sleep(1.0)
    assert len(peers.requests()) == 2


async def test_an_unregistered_token_is_not_used_again_until_the_app_registers_a_new_one(
    stack: Stack, peers: ProviderPeers
) -> None:
    await _apply(stack, "order-shipped-push.yaml")
    await _identify(stack, "tim", {"push_token": APNS_TOKEN})
    peers.script(APNS, apns_error(410, "Unregistered", timestamp_ms=1_700_000_000_000))

    await _track(stack, _event("tim", "order_shipped", order_id="T-1", total=99, eta="x"))
    await asyncio.to_thread(peers.wait_for, 1, APNS, 20.0)
    await _wait_for_states(stack, "tim", ["dead"])

    await _track(stack, _event("tim", "order_shipped", order_id="T-2", total=99, eta="x"))
    await _wait_for_states(stack, "tim", ["dead", "suppressed"])
    assert len(peers.requests(APNS)) == 1

    fresh_token = "cd" * 32
    await _identify(stack, "tim", {"push_token": fresh_token})
    await _track(stack, _event("tim", "order_shipped", order_id="T-3", total=99, eta="x"))
    [*_, delivered] = await asyncio.to_thread(peers.wait_for, 2, APNS, 20.0)
    assert delivered.path == f"/3/device/{fresh_token}"


async def _wait_for_states(stack: Stack, user_id: str, expected: list[str]) -> None:
    conn = await asyncpg.connect(stack.database_url)
    try:
        for _ in range(200):
            rows = await conn.fetch(
                "SELECT state FROM sends WHERE user_id = $1 ORDER BY created_at", user_id
            )
            if [r["state"] for r in rows] == expected:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"send states {[r['state'] for r in rows]} != {expected}")
    finally:
        await conn.close()
