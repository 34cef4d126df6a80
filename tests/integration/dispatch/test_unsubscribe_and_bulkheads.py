"""One-click unsubscribe over real HTTP, and bulkheads: a hanging provider stalls neither the
queue consumer nor other channels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from nudge.bus import BusNames
from nudge.testing.sinks import ReceivedRequest
from services.dispatch.application import Unsubscriber
from services.dispatch.http_api import PublicApp, start_http_server
from services.dispatch.unsubscribe import UnsubscribeRequest
from tests.integration.dispatch.conftest import (
    UNSUBSCRIBE_URL,
    Rig,
    consuming,
    jetstream,
    make_dispatcher,
    publish,
)


@pytest.fixture
async def endpoint(rig: Rig) -> AsyncIterator[str]:
    server = await start_http_server("127.0.0.1:0", PublicApp(Unsubscriber(rig.pool, rig.links)))
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


async def test_marketing_mail_carries_one_click_unsubscribe_headers(rig: Rig) -> None:
    marketing, transactional = rig.request(), rig.request(kind="transactional")
    await rig.dispatcher.accept(marketing)
    await rig.dispatcher.accept(transactional)

    first, second = rig.smtp.messages
    header = str(first.message["List-Unsubscribe"])
    assert header.startswith(f"<{UNSUBSCRIBE_URL}?token=")
    assert header.endswith(">")
    assert first.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    token = parse_qs(urlsplit(header[1:-1]).query)["token"][0]
    assert rig.links.verify(token) == UnsubscribeRequest("acme", "ann", "email", marketing.send_id)
    assert second.message["List-Unsubscribe"] is None


async def test_one_click_post_unsubscribes_and_suppresses_the_pending_send(
    rig: Rig, endpoint: str
) -> None:
    await rig.dispatcher.accept(rig.request())
    header = str(rig.smtp.messages[0].message["List-Unsubscribe"])[1:-1]
    link = endpoint + "/unsubscribe?" + urlsplit(header).query
    pending = rig.request()
    await rig.dispatcher.record(pending)

    async with httpx.AsyncClient() as client:
        page = await client.get(link)  # a mail scanner fetching the link changes nothing
        assert page.status_code == 200
        assert '<form method="post"' in page.text
        assert await rig.events("$identify") == []
        clicked = await client.post(
            link,
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        again = await client.post(link, content=b"List-Unsubscribe=One-Click")
        forged = await client.post(link.replace("token=v1.", "token=v1.x"))
    assert (clicked.status_code, again.status_code, forged.status_code) == (200, 200, 400)

    [identify] = await rig.events("$identify")
    assert identify["properties"] == {"email_subscribe": "unsubscribed"}
    assert identify["context"]["source"] == "list-unsubscribe"
    await rig.dispatcher.attempt(pending.send_id)
    assert (await rig.send(pending.send_id))["state"] == "suppressed"
    assert len(rig.smtp.messages) == 1


async def test_a_hanging_provider_stalls_neither_the_consumer_nor_other_channels(
    rig: Rig, nats_url: str, test_id: str
) -> None:

    def hang(_: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        time.sleep(3)
        return (200, {}, b"{}")

    rig.http.responder = hang
    dispatcher = make_dispatcher(
        rig.pool, rig.clock, rig.smtp, rig.http, rig.links, webhook_timeout_s=10, concurrency=2
    )
    rig.extra.append(dispatcher)
    names = BusNames(f"t{test_id}")
    async with jetstream(nats_url, names) as js, consuming(js, names, dispatcher):
        hooks = [rig.request(user=f"h{i}", channel="webhook") for i in range(12)]
        for request in hooks:
            await publish(js, names, request)
        await asyncio.to_thread(rig.http.wait_for, 1, 5.0)  # the provider is hanging now
        started = time.monotonic()
        await publish(js, names, rig.request(user="m"))
        arrived = await asyncio.to_thread(rig.smtp.wait_for, 1, 5.0)
        elapsed = time.monotonic() - started

    assert len(arrived) == 1
    assert elapsed < 2.5  # the mail did not wait for the 3 s webhook provider
    assert len(rig.http.requests) <= 2  # at most `concurrency` calls in flight on that channel
    rows = await rig.pool.fetch("SELECT state, count(*) FROM sends GROUP BY state")
    assert sum(r["count"] for r in rows) == 13  # every request was recorded (and acked)
