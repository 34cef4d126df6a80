"""A send request survives an outage longer than a bounded MaxDeliver would: the JetStream
consumer (real nats-server) NAKs with a growing delay and never drops the request (also when an
older version created the consumer with MaxDeliver 8), and a poison request is terminated at
once instead of being retried."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest

from nudge import bus
from nudge.bus import BusNames
from nudge.dispatch.v1.dispatch_pb2 import SendRequest
from services.dispatch.application import Dispatcher
from tests.integration.dispatch.conftest import Rig, consuming, jetstream, publish

FAILURES = 12  # more deliveries than the former MaxDeliver of 8


class FlakyDispatcher:
    """The rig's dispatcher behind a database that is down for the first `failures` records."""

    def __init__(self, inner: Dispatcher, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.attempts = 0

    async def record(self, request: SendRequest) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError("database is down")
        await self.inner.record(request)

    def submit(self, send_id: str, channel: str) -> None:
        self.inner.submit(send_id, channel)


async def test_a_send_request_outlives_an_outage_of_many_deliveries(
    rig: Rig,
    nats_url: str,
    test_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(bus, "REDELIVERY_BACKOFF_S", (0.02, 0.05))
    flaky = FlakyDispatcher(rig.dispatcher, FAILURES)
    names = BusNames(f"t{test_id}")
    request = rig.request(user="ann")
    async with jetstream(nats_url, names) as js:
        # The consumer as an older version created it, with a bounded MaxDeliver: updated.
        older = bus.work_queue_consumer("dispatch", f"{names.prefix}.dispatch.>", 5)
        older.max_deliver = 8
        await js.add_consumer(names.dispatch_stream, older)
        async with consuming(js, names, cast(Dispatcher, flaky), ack_wait_s=5):
            with caplog.at_level(logging.ERROR, logger="nudge.bus"):
                await publish(js, names, request)
                arrived = await asyncio.to_thread(rig.smtp.wait_for, 1, 10.0)

    assert len(arrived) == 1
    assert flaky.attempts == FAILURES + 1
    for _ in range(100):  # the mail is in before dispatch records the outcome
        if (await rig.send(request.send_id))["state"] == "sent":
            break
        await asyncio.sleep(0.05)
    assert (await rig.send(request.send_id))["state"] == "sent"
    assert any("failed 10 deliveries" in record.getMessage() for record in caplog.records)


async def test_a_poison_request_is_terminated_not_retried(
    rig: Rig, nats_url: str, test_id: str
) -> None:
    flaky = FlakyDispatcher(rig.dispatcher, 0)
    names = BusNames(f"t{test_id}")
    async with (
        jetstream(nats_url, names) as js,
        consuming(js, names, cast(Dispatcher, flaky)),
    ):
        await js.publish(names.dispatch_subject("acme", "email"), b"\xff not a SendRequest")
        await publish(js, names, rig.request(user="bob"))  # the next one is not blocked
        arrived = await asyncio.to_thread(rig.smtp.wait_for, 1, 10.0)
        info = await js.consumer_info(names.dispatch_stream, "dispatch")

    assert len(arrived) == 1
    assert flaky.attempts == 1  # only the valid request reached the dispatcher
    assert info.num_pending == 0
    assert info.num_redelivered == 0
