"""Every use case of the product end to end, through the public gRPC APIs, with time skipping.

Each test runs the four services as processes, applies a campaign from `examples/campaigns/`,
tracks events with IngestService, skips the database clock forward (as `nudge time advance`
does: `dev_clock.skew` plus a NOTIFY on `nudge_clock`), and checks what the SMTP sink received,
what `ExplainDecisions` says, and that replaying the store equals the live projection.

Timers fire `NUDGE_RULES_FIRE_MARGIN_S` (5 s) after an instance's due time, so every skip goes
one minute past the due time.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from nudge.rules.v1 import rules_pb2
from tests.e2e.client import PAST_DUE, Nudge, cli, inbox, settle
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e


# --- 1. action + property filter + personalization -------------------------------------------


async def test_order_shipped_sends_a_personalized_email_only_for_orders_over_20(
    stack: Stack,
) -> None:
    nudge = Nudge(stack)
    await nudge.apply("order-shipped.yaml")
    await nudge.identify("ada", email="ada@example.test", first_name="Ada")
    await nudge.identify("bob", email="bob@example.test")
    await nudge.track("ada", "order_shipped", order_id="A-17", total=42, eta="Monday")
    await nudge.track("bob", "order_shipped", order_id="B-1", total=5, eta="Friday")
    await nudge.track("bob", "order_shipped", order_id="B-2", total=21, eta="Sunday")

    mails = inbox(await nudge.mails(2))
    assert mails == {
        "ada@example.test": [("Your order A-17 is on its way", "Hi Ada, it arrives Monday.")],
        "bob@example.test": [("Your order B-2 is on its way", "Hi there, it arrives Sunday.")],
    }
    kinds = await nudge.wait_for_kinds("bob", "order-shipped", lambda k: "message.sent" in k)
    assert kinds == ["filtered_out", "triggered", "send_planned", "message.sent"]
    await settle(stack, 2)
    await nudge.verify_replay()


# --- 2. relative time with message branches --------------------------------------------------


async def test_onboarding_arrives_a_day_after_the_first_session_with_the_right_branch(
    stack: Stack,
) -> None:
    nudge = Nudge(stack)
    await nudge.identify("old", email="old@example.test")
    await nudge.track("old", "session_start")  # before the campaign existed: never onboarded
    await nudge.wait_for_count("old", "session_start", 1)
    await nudge.apply("onboarding.yaml")
    for user in ("new", "pro", "old"):
        await nudge.identify(user, email=f"{user}@example.test", first_name=user.title())
    await nudge.track("new", "session_start")
    await nudge.track("pro", "session_start")
    await nudge.track("pro", "feature_x_used")
    await nudge.track("new", "session_start")  # not the first: no second instance
    await nudge.track("old", "session_start")
    await nudge.wait_for_count("old", "session_start", 2)
    await nudge.wait_for_count("new", "session_start", 2)
    assert await nudge.kinds("new", "onboarding-day-1") == ["triggered"]
    assert await nudge.kinds("old", "onboarding-day-1") == []

    await nudge.advance(timedelta(hours=23))
    await asyncio.sleep(1.0)
    assert stack.smtp.messages == []  # not a day yet
    await nudge.advance(timedelta(hours=1) + PAST_DUE)

    mails = inbox(await nudge.mails(2))
    assert mails == {
        "new@example.test": [
            ("Have you tried Feature X?", "Hi New, Feature X saves you an hour a week.")
        ],
        "pro@example.test": [
            (
                "Three more things Feature X can do",
                "Hi Pro, you have used Feature X 1 times already.",
            )
        ],
    }
    # The mail reaches the sink before dispatch commits `message.sent`: wait for the record.
    await nudge.wait_for_kinds("new", "onboarding-day-1", lambda k: "message.sent" in k)
    [triggered, sent, _] = await nudge.why("new", "onboarding-day-1")
    assert triggered.summary.startswith("triggered: first session_start; due 1d later; delayed")
    assert sent.summary == "re-checked and sent: message 0 (email)"
    await settle(stack, 2)
    await nudge.verify_replay()


# --- 3. threshold, an edge ---------------------------------------------------------------------


async def test_whale_nudge_is_sent_once_when_the_threshold_is_crossed(stack: Stack) -> None:
    nudge = Nudge(stack)
    await nudge.apply("whale.yaml")
    await nudge.identify("fan", email="fan@example.test", first_name="Fan")
    await nudge.identify("vip", email="vip@example.test")
    for _ in range(4):
        await nudge.track("fan", "session_start")
    await nudge.wait_for_count("fan", "session_start", 4)
    assert await nudge.kinds("fan", "whale") == []
    await nudge.track("fan", "session_start")  # the fifth in 7 days: crossed
    [mail] = await nudge.mails(1)
    assert mail.rcpt_tos == ("fan@example.test",)
    assert mail.subject == "A thank-you from us"

    for _ in range(3):
        await nudge.track("fan", "session_start")  # still true: no new edge
    await nudge.track("fan", "loyalty_page_viewed")
    await nudge.track("vip", "loyalty_page_viewed")  # the other side of the condition
    await nudge.wait_for_count("fan", "loyalty_page_viewed", 1)
    [_, second] = await nudge.mails(2)
    assert second.rcpt_tos == ("vip@example.test",)
    kinds = await nudge.wait_for_kinds("fan", "whale", lambda k: "message.sent" in k)
    assert kinds == ["triggered", "send_planned", "message.sent"]
    await settle(stack, 2)
    await nudge.verify_replay()


# --- 4. inactivity, re-armed by every session ------------------------------------------------


async def test_win_back_after_14_days_without_a_session_but_not_for_a_user_back_on_day_13(
    stack: Stack,
) -> None:
    nudge = Nudge(stack)
    await nudge.apply("win-back.yaml")
    await nudge.identify("gone", email="gone@example.test", first_name="Gone")
    await nudge.identify("back", email="back@example.test", first_name="Back")
    await nudge.track("gone", "session_start")
    await nudge.track("back", "session_start")
    await nudge.wait_for_kinds("back", "win-back", lambda k: k == ["triggered"])

    await nudge.advance(timedelta(days=13))
    await nudge.track("back", "session_start")  # day 13: re-arms the check
    await nudge.wait_for_kinds("back", "win-back", lambda k: k == ["triggered", "rearmed"])
    await nudge.advance(timedelta(days=1) + PAST_DUE)

    [mail] = await nudge.mails(1)
    assert mail.rcpt_tos == ("gone@example.test",)
    assert mail.subject == "We miss you, Gone"
    await settle(stack, 1)
    assert await nudge.kinds("back", "win-back") == ["triggered", "rearmed"]

    await nudge.advance(timedelta(days=13))  # day 27 = 14 days after back's last session
    [_, later] = await nudge.mails(2)
    assert later.rcpt_tos == ("back@example.test",)
    kinds = await nudge.wait_for_kinds("back", "win-back", lambda k: "message.sent" in k)
    assert kinds == ["triggered", "rearmed", "send_planned", "message.sent"]
    await settle(stack, 2)
    await nudge.verify_replay()


# --- 5. delay + correlated exception ----------------------------------------------------------


async def test_abandoned_cart_reminder_is_cancelled_only_by_a_purchase_of_the_same_cart(
    stack: Stack,
) -> None:
    nudge = Nudge(stack)
    await nudge.apply("abandoned-cart.yaml")
    await nudge.identify("ann", email="ann@example.test")
    await nudge.identify("ben", email="ben@example.test")
    await nudge.track("ann", "add_to_cart", cart_id="A", value=20)
    await nudge.track("ann", "add_to_cart", cart_id="B", value=30)
    purchase = await nudge.track("ann", "purchase", cart_id="A", amount=20)
    await nudge.track("ben", "add_to_cart", cart_id="C", value=15)
    await nudge.track("ben", "purchase", cart_id="D", amount=99)  # another cart
    await nudge.wait_for_count("ben", "purchase", 1)
    kinds = await nudge.wait_for_kinds("ann", "abandoned-cart", lambda k: "cancelled" in k)
    assert kinds == ["triggered", "triggered", "cancelled"]  # at once, not after the hour
    assert await nudge.kinds("ben", "abandoned-cart") == ["triggered"]

    await nudge.advance(timedelta(hours=1) + PAST_DUE)
    mails = inbox(await nudge.mails(2))
    assert mails == {
        "ann@example.test": [
            ("You left something in your cart", "Cart B (30 EUR) is still waiting for you.")
        ],
        "ben@example.test": [
            ("You left something in your cart", "Cart C (15 EUR) is still waiting for you.")
        ],
    }
    await settle(stack, 2)

    why = await asyncio.to_thread(cli, stack, "why", "ann", "abandoned-cart")
    assert why.returncode == 0, why.stderr
    assert f"cancelled by purchase '{purchase}'" in why.stdout
    assert "delivered by dispatch (email)" in why.stdout
    replay = await asyncio.to_thread(cli, stack, "replay")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert replay.stdout.startswith("match: ")


# --- 6. re-eligibility ------------------------------------------------------------------------


async def test_a_user_is_re_eligible_only_after_the_window(stack: Stack) -> None:
    nudge = Nudge(stack)
    await nudge.apply("price-drop.yaml")
    await nudge.identify("eve", email="eve@example.test", first_name="Eve")
    await nudge.track("eve", "price_dropped", item="Kettle", discount=20)
    [first] = await nudge.mails(1)
    assert first.subject == "Kettle is 20% off"
    await nudge.advance(timedelta(days=6))
    await nudge.track("eve", "price_dropped", item="Toaster", discount=30)
    kinds = await nudge.wait_for_kinds("eve", "price-drop", lambda k: "not_reeligible" in k)
    assert kinds[-1] == "not_reeligible"
    await settle(stack, 1)

    await nudge.advance(timedelta(days=1) + PAST_DUE)  # 7 days after the first send
    await nudge.track("eve", "price_dropped", item="Blender", discount=15)
    [_, second] = await nudge.mails(2)
    assert second.subject == "Blender is 15% off"
    [refused] = [d for d in await nudge.why("eve", "price-drop") if d.kind == "not_reeligible"]
    assert refused.summary.startswith("not re-eligible: already received at")
    assert "re-eligible after 7d" in refused.summary
    await settle(stack, 2)
    await nudge.verify_replay()


# --- 7. versions and pausing ------------------------------------------------------------------


async def test_a_paused_campaign_holds_its_pending_message_until_resumed(stack: Stack) -> None:
    nudge = Nudge(stack)
    v1 = await nudge.apply("abandoned-cart.yaml")
    await nudge.identify("kim", email="kim@example.test")
    await nudge.identify("lee", email="lee@example.test")
    await nudge.track("kim", "add_to_cart", cart_id="K", value=50)
    await nudge.wait_for_kinds("kim", "abandoned-cart", lambda k: k == ["triggered"])
    v2 = await nudge.apply("abandoned-cart.yaml", name="Abandoned cart, version 2")
    assert (v1.version, v2.version) == (1, 2)  # kim's pending instance keeps version 1

    paused = await nudge.rules(
        "PauseCampaign", rules_pb2.PauseCampaignRequest(campaign_id="abandoned-cart")
    )
    assert (paused.campaign.status, paused.campaign.version) == ("paused", 2)
    await nudge.track("lee", "add_to_cart", cart_id="L", value=50)  # no new instance
    await nudge.advance(timedelta(hours=1) + PAST_DUE)
    await nudge.wait_for_kinds("kim", "abandoned-cart", lambda k: k == ["triggered", "paused"])
    assert await nudge.kinds("lee", "abandoned-cart") == ["paused"]
    await settle(stack, 0)

    resumed = await nudge.rules(
        "ResumeCampaign", rules_pb2.ResumeCampaignRequest(campaign_id="abandoned-cart")
    )
    assert resumed.campaign.status == "active"
    [mail] = await nudge.mails(1)
    assert mail.rcpt_tos == ("kim@example.test",)
    decisions = await nudge.why("kim", "abandoned-cart")
    assert [(d.kind, d.version) for d in decisions if d.source == "rules"] == [
        ("triggered", 1),
        ("paused", 1),
        ("resumed", 1),
        ("send_planned", 1),
    ]
    await settle(stack, 1)
    await nudge.verify_replay()
