"""Provider misbehaviour against real peers: exact arrivals and final states (issue 4)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from nudge.testing.sinks import ReceivedRequest, SmtpFault
from services.dispatch import store
from tests.integration.dispatch.conftest import Rig


async def test_smtp_421_then_ok_is_delivered_once_after_two_attempts(rig: Rig) -> None:
    rig.smtp.faults.append(SmtpFault("mail", "421 4.3.2 Service not available"))
    request = rig.request()

    await rig.dispatcher.accept(request)
    first = await rig.send(request.send_id)
    assert (first["state"], first["attempts"]) == ("retry_wait", 1)
    assert "421" in first["reason"]
    assert rig.smtp.messages == []

    await rig.run_until_settled(timedelta(seconds=2))

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"], row["reason"]) == ("sent", 2, "")
    assert len(rig.smtp.messages) == 1
    assert len(await rig.events("message.sent")) == 1


async def test_smtp_550_is_dead_after_one_attempt_with_a_failed_event(rig: Rig) -> None:
    rig.smtp.faults.append(SmtpFault("rcpt", "550 5.1.1 No such user"))
    request = rig.request()

    await rig.dispatcher.accept(request)
    await rig.run_until_settled(timedelta(minutes=5))

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert "550" in row["reason"]
    assert rig.smtp.messages == []
    [failed] = await rig.events("message.failed")
    assert failed["properties"]["send_id"] == request.send_id
    assert failed["properties"]["undeliverable_address"] == "ann@example.test"
    [letter] = await store.list_dead_letters(rig.pool, "acme", 10, False)
    assert (letter["send_id"], letter["attempts"]) == (request.send_id, 1)
    assert row["cap_reserved_at"] is None  # the slot is released on permanent failure


async def test_hard_bounce_suppresses_later_sends_to_that_address_until_opt_in(rig: Rig) -> None:
    rig.smtp.faults.append(SmtpFault("rcpt", "550 5.1.1 No such user"))
    await rig.dispatcher.accept(rig.request())
    later = rig.request()
    await rig.dispatcher.accept(later)
    assert (await rig.send(later.send_id))["state"] == "suppressed"
    assert "undeliverable" in (await rig.send(later.send_id))["reason"]
    [suppressed] = await rig.events("message.suppressed")
    assert suppressed["properties"]["code"] == "undeliverable"

    other_address = rig.request(traits={"email": "ann.new@example.test"})
    await rig.dispatcher.accept(other_address)
    assert (await rig.send(other_address.send_id))["state"] == "sent"

    await rig.identify("ann", {"email_subscribe": "opted_in"})  # a fresh confirmation
    again = rig.request()
    await rig.dispatcher.accept(again)
    assert (await rig.send(again.send_id))["state"] == "sent"
    assert [m.rcpt_tos for m in rig.smtp.messages] == [
        ("ann.new@example.test",),
        ("ann@example.test",),
    ]


async def test_smtp_reply_lost_after_data_is_ambiguous_counted_and_never_resent(rig: Rig) -> None:
    rig.smtp.faults.append(SmtpFault("lose_reply"))
    request = rig.request()

    await rig.dispatcher.accept(request)
    await rig.advance(timedelta(hours=2))
    await rig.sweep()

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"], row["ambiguous_attempts"]) == ("ambiguous", 1, 1)
    assert len(rig.smtp.messages) == 1  # the provider has it; we never send it again
    assert row["cap_reserved_at"] is not None  # the user may have it: it counts


async def test_transactional_mail_is_retried_after_a_lost_reply(rig: Rig) -> None:
    rig.smtp.faults.append(SmtpFault("lose_reply"))
    request = rig.request(kind="transactional")

    await rig.dispatcher.accept(request)
    await rig.run_until_settled(timedelta(seconds=2))

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"], row["ambiguous_attempts"]) == ("sent", 2, 1)
    # at-least-once by policy: a second copy, with the same Message-ID for the receiver
    ids = {m.message["Message-ID"] for m in rig.smtp.messages}
    assert len(rig.smtp.messages) == 2
    assert len(ids) == 1


async def test_webhook_429_honours_retry_after(rig: Rig) -> None:
    answers = iter([(429, {"Retry-After": "120"}, b"slow down")])
    rig.http.responder = lambda _: next(answers, (200, {}, b"{}"))
    request = rig.request(channel="webhook")

    before = await rig.now()
    await rig.dispatcher.accept(request)
    row = await rig.send(request.send_id)
    assert row["state"] == "retry_wait"
    assert row["next_at"] - before >= timedelta(seconds=120)

    await rig.advance(timedelta(seconds=100))
    assert await rig.sweep() == 0  # not due yet
    assert len(rig.http.requests) == 1
    await rig.advance(timedelta(seconds=25))
    await rig.sweep()

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"]) == ("sent", 2)
    assert len(rig.http.requests) == 2


async def test_webhook_500_is_retried_with_backoff_until_it_succeeds(rig: Rig) -> None:
    script: list[tuple[int, dict[str, str], bytes]] = [(500, {}, b"oops"), (503, {}, b"down")]
    answers = iter(script)
    rig.http.responder = lambda _: next(answers, (200, {}, b"{}"))
    request = rig.request(channel="webhook")

    await rig.dispatcher.accept(request)
    waits = []
    for _ in range(2):
        row = await rig.send(request.send_id)
        assert row["state"] == "retry_wait"
        waits.append(row["next_at"] - row["updated_at"])
        await rig.advance(row["next_at"] - await rig.now() + timedelta(milliseconds=50))
        await rig.sweep()

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"]) == ("sent", 3)
    assert len(rig.http.requests) == 3
    assert waits[1] > waits[0]  # exponential backoff (with jitter within each step)


async def test_webhook_timeout_is_retried_with_the_same_webhook_id(rig: Rig) -> None:
    slow = [True]

    def respond(_: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        if slow.pop() if slow else False:
            time.sleep(2.5)  # longer than the channel's 2 s total timeout
        return (200, {}, b"{}")

    rig.http.responder = respond
    request = rig.request(channel="webhook")

    await rig.dispatcher.accept(request)
    row = await rig.send(request.send_id)
    assert (row["state"], row["ambiguous_attempts"]) == ("retry_wait", 1)
    await rig.run_until_settled(timedelta(seconds=2))

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"], row["ambiguous_attempts"]) == ("sent", 2, 1)
    assert rig.http.webhook_ids() == [request.send_id, request.send_id]


async def test_webhook_reset_after_accept_is_retried_with_the_same_webhook_id(rig: Rig) -> None:
    answers: list[tuple[int, dict[str, str], bytes] | None] = [None]
    rig.http.responder = lambda _: answers.pop() if answers else (200, {}, b"{}")
    request = rig.request(channel="webhook")

    await rig.dispatcher.accept(request)
    await rig.run_until_settled(timedelta(seconds=2))

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"], row["ambiguous_attempts"]) == ("sent", 2, 1)
    # two arrivals of one webhook-id: a receiver deduping by it acts once
    assert rig.http.webhook_ids() == [request.send_id, request.send_id]


async def test_webhook_connection_refused_is_transient(rig: Rig) -> None:
    request = rig.request(channel="webhook", template={"url": "http://127.0.0.1:9/hook"})
    await rig.dispatcher.accept(request)
    row = await rig.send(request.send_id)
    assert (row["state"], row["ambiguous_attempts"]) == ("retry_wait", 0)
    assert "connect" in row["reason"]


async def test_webhook_4xx_is_dead_at_once(rig: Rig) -> None:
    rig.http.responder = lambda _: (404, {}, b"no such hook")
    request = rig.request(channel="webhook")
    await rig.dispatcher.accept(request)
    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert len(await rig.events("message.failed")) == 1


async def test_transient_failures_beyond_the_retry_window_go_dead(rig: Rig) -> None:
    rig.http.responder = lambda _: (503, {}, b"down")
    request = rig.request(channel="webhook")
    await rig.dispatcher.accept(request)
    await rig.run_until_settled(timedelta(minutes=15), rounds=40)
    row = await rig.send(request.send_id)
    assert row["state"] == "dead"
    assert "retry window" in row["reason"]
    assert len(rig.http.requests) == row["attempts"] > 2


async def test_render_error_is_dead_with_a_clear_reason(rig: Rig) -> None:
    request = rig.request(
        template={"to": "{{ user.traits.email }}", "subject": "Hi {{ user.traits.nope }}"}
    )
    await rig.dispatcher.accept(request)
    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"]) == ("dead", 0)
    assert "render failed: subject" in row["reason"]
    assert rig.smtp.messages == []


async def test_dead_letter_replay_keeps_the_send_id_and_is_idempotent(rig: Rig) -> None:
    rig.http.responder = lambda _: (400, {}, b"bad")
    request = rig.request(channel="webhook")
    await rig.dispatcher.accept(request)
    [letter] = await store.list_dead_letters(rig.pool, "acme", 10, False)

    rig.http.responder = None  # the receiver was fixed
    async with rig.pool.acquire() as conn, conn.transaction():
        first = await store.replay_dead_letter(conn, "acme", letter["dead_letter_id"])
    async with rig.pool.acquire() as conn, conn.transaction():
        second = await store.replay_dead_letter(conn, "acme", letter["dead_letter_id"])
    await rig.sweep()
    await rig.sweep()

    assert first is not None
    assert (first.replayed, first.send_id) == (True, request.send_id)
    assert second is not None
    assert second.replayed is False
    row = await rig.send(request.send_id)
    assert (row["state"], row["replays"]) == ("sent", 1)
    assert rig.http.webhook_ids() == [request.send_id, request.send_id]
    assert len(await rig.events("message.sent")) == 1
    assert await store.list_dead_letters(rig.pool, "acme", 10, False) == []


async def test_a_claim_whose_worker_died_before_the_call_is_sent_once_later(rig: Rig) -> None:
    request = rig.request()
    await rig.dispatcher.record(request)
    claimed = await rig.dispatcher.claim(request.send_id)  # ...and the worker dies here
    assert [c.send.state for c in claimed] == ["claimed"]

    await rig.advance(timedelta(seconds=31))  # past the lease
    await rig.sweep()

    row = await rig.send(request.send_id)
    assert (row["state"], row["attempts"], row["ambiguous_attempts"]) == ("sent", 1, 0)
    assert len(rig.smtp.messages) == 1


async def test_an_attempt_whose_worker_died_mid_call_is_ambiguous_for_mail(rig: Rig) -> None:
    mail, hook = rig.request(), rig.request(channel="webhook")
    for request in (mail, hook):
        await rig.dispatcher.record(request)
        [claimed] = await rig.dispatcher.claim(request.send_id)
        assert await store.mark_attempting(rig.pool, claimed.send, timedelta(seconds=30))
        # ...the provider call is under way when the worker dies

    await rig.advance(timedelta(seconds=31))
    await rig.run_until_settled(timedelta(seconds=2))

    assert (await rig.send(mail.send_id))["state"] == "ambiguous"
    hook_row = await rig.send(hook.send_id)
    assert (hook_row["state"], hook_row["ambiguous_attempts"]) == ("sent", 1)
    assert rig.smtp.messages == []
    assert rig.http.webhook_ids() == [hook.send_id]


async def test_a_late_outcome_from_a_superseded_worker_is_not_recorded(rig: Rig) -> None:
    request = rig.request()
    await rig.dispatcher.record(request)
    [old] = await rig.dispatcher.claim(request.send_id)
    await rig.advance(timedelta(seconds=31))
    await rig.sweep()  # claimed again and sent by "another worker"

    async with rig.pool.acquire() as conn, conn.transaction():
        assert not await store.mark_dead(conn, old.send, "late failure")
    row = await rig.send(request.send_id)
    assert (row["state"], row["claim_no"]) == ("sent", 2)


async def test_two_replicas_sweeping_concurrently_send_each_message_once(rig: Rig) -> None:
    replica = await rig.replica()
    requests = [rig.request(user=f"u{i}") for i in range(20)]
    for request in requests:
        await rig.dispatcher.record(request)
    await rig.advance(timedelta(seconds=6))  # past every pickup deadline
    await asyncio.gather(rig.dispatcher.sweep_once(), replica.sweep_once())
    await asyncio.gather(rig.dispatcher.lanes.wait_idle(), replica.lanes.wait_idle())
    await rig.sweep()

    subjects = sorted(m.subject for m in rig.smtp.messages)
    assert len(subjects) == len(set(subjects)) == 20
