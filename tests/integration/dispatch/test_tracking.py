"""Open and click tracking against real parts: the dispatcher renders and rewrites a marketing
email, a real SMTP sink receives it, and the links in the received HTML are fetched over real
HTTP from dispatch's public server, which records `message.opened` / `message.clicked` in the
event store. Also: `experiment_group` on outcome events, `global_control` in the policy."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest

from nudge.testing.sinks import html_links
from services.dispatch import store
from services.dispatch.application import (
    PREVIEW_UNSUBSCRIBE_URL,
    Dispatcher,
    Tracker,
    TrackingConfig,
    Unsubscriber,
    preview,
)
from services.dispatch.channels.base import Channel
from services.dispatch.channels.email import SmtpChannel
from services.dispatch.http_api import PublicApp, start_http_server
from services.dispatch.policy import PolicyError
from services.dispatch.tracking import PIXEL_GIF, TokenKind, click_url, make_token
from tests.integration.dispatch.conftest import WORKSPACE, Rig

SECRET = b"t" * 32
SHOP = "https://shop.example/cart?id=1&utm=mail"
HTML = (
    "<html><body><p>Your cart is waiting.</p>"
    f'<a href="{SHOP.replace("&", "&amp;")}">Back to your cart</a> '
    '<a href="mailto:help@shop.example">Help</a> '
    '<a href="https://shop.example/help">FAQ</a>'
    "</body></html>"
)


def email(html: str = HTML) -> dict[str, str]:
    return {
        "to": "{{ user.traits.email }}",
        "subject": "Your cart",
        "body": "Your cart is waiting.",
        "html": html,
    }


@dataclass
class Tracked:
    """A tracking dispatcher and the public server its links point at."""

    dispatcher: Dispatcher
    base: str


@pytest.fixture
async def tracked(rig: Rig) -> AsyncIterator[Tracked]:
    app = PublicApp(Unsubscriber(rig.pool, rig.links), Tracker(rig.pool, SECRET))
    server = await start_http_server("127.0.0.1:0", app)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    channels: dict[str, Channel] = {
        "email": SmtpChannel(rig.smtp.url, "Nudge <noreply@nudge.test>", timeout_s=2)
    }
    dispatcher = Dispatcher(
        rig.pool,
        channels,
        rig.clock,
        lease=timedelta(seconds=30),
        unsubscribe_links=rig.links,
        tracking=TrackingConfig(base, SECRET),
    )
    rig.extra.append(dispatcher)  # the rig drains it and closes its channels
    yield Tracked(dispatcher, base)
    server.close()
    await server.wait_closed()


def received_html(rig: Rig, index: int = -1) -> str:
    html = rig.smtp.messages[index].html
    assert html
    return html


async def stored_links(rig: Rig, send_id: str) -> Any:
    return (await rig.send(send_id))["tracked_links"]


async def test_opens_and_clicks_of_a_marketing_email_are_recorded_once(
    rig: Rig, tracked: Tracked
) -> None:
    request = rig.request(template=email())
    request.experiment_group = "wait-1h"
    await tracked.dispatcher.accept(request)

    assert (await rig.send(request.send_id))["state"] == "sent"
    found = html_links(received_html(rig))
    shop, mailto, faq = found.hrefs
    assert shop.startswith(f"{tracked.base}/c/")
    assert faq.startswith(f"{tracked.base}/c/")
    assert mailto == "mailto:help@shop.example"  # not trackable: left as written
    [pixel] = found.images
    assert pixel.startswith(f"{tracked.base}/o/")
    assert await stored_links(rig, request.send_id) == [SHOP, "https://shop.example/help"]

    async with httpx.AsyncClient(follow_redirects=False) as client:
        opened = [await client.get(pixel), await client.head(pixel), await client.get(pixel)]
        clicks = [await client.get(shop), await client.get(shop), await client.get(faq)]

    for response in opened:
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/gif"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-length"] == str(len(PIXEL_GIF))
    assert opened[0].content == PIXEL_GIF
    assert opened[1].content == b""
    assert [r.status_code for r in clicks] == [302, 302, 302]
    assert [r.headers["location"] for r in clicks] == [SHOP, SHOP, "https://shop.example/help"]

    [open_event] = await rig.events("message.opened")
    assert open_event["event_id"] == f"{request.send_id}:opened"
    assert open_event["properties"] == {
        "send_id": request.send_id,
        "campaign_id": "promo",
        "campaign_version": 1,
        "channel": "email",
        "kind": "marketing",
        "experiment_group": "wait-1h",
    }
    clicked = await rig.events("message.clicked")
    assert [e["event_id"] for e in clicked] == [
        f"{request.send_id}:clicked:0",
        f"{request.send_id}:clicked:1",
    ]
    assert clicked[0]["properties"] == {
        **open_event["properties"],
        "link_index": 0,
        "url": SHOP,
    }
    assert clicked[1]["properties"]["link_index"] == 1


async def test_a_token_we_cannot_vouch_for_never_redirects(rig: Rig, tracked: Tracked) -> None:
    request = rig.request(template=email())
    await tracked.dispatcher.accept(request)
    found = html_links(received_html(rig))
    shop, pixel = found.hrefs[0], found.images[0]
    token = shop.rsplit("/", 1)[1]
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    other_key = click_url(tracked.base, request.send_id, 0, b"x" * 32)
    beyond = click_url(tracked.base, request.send_id, 2, SECRET)  # 2 links were stored
    unknown_send = click_url(tracked.base, str(uuid.uuid4()), 0, SECRET)
    open_as_click = f"{tracked.base}/c/{pixel.rsplit('/', 1)[1]}"

    async with httpx.AsyncClient(follow_redirects=False) as client:
        refused = {
            "tampered": await client.get(f"{tracked.base}/c/{tampered}"),
            "other key": await client.get(other_key),
            "index beyond the links": await client.get(beyond),
            "unknown send": await client.get(unknown_send),
            "open token": await client.get(open_as_click),
            "garbage": await client.get(f"{tracked.base}/c/https://evil.example"),
            "empty": await client.get(f"{tracked.base}/c/"),
        }
        bad_pixel = await client.get(f"{tracked.base}/o/{tampered}")
        head_click = await client.head(shop)

    for what, response in refused.items():
        assert response.status_code == 404, what
        assert "location" not in response.headers, what
    # A broken pixel would show in the mail: a bad open token still gets the image.
    assert (bad_pixel.status_code, bad_pixel.content) == (200, PIXEL_GIF)
    assert head_click.status_code == 405  # a link checker's HEAD is not a click
    assert await rig.events("message.clicked") == []
    assert await rig.events("message.opened") == []


async def test_transactional_email_is_not_rewritten(rig: Rig, tracked: Tracked) -> None:
    request = rig.request(kind="transactional", template=email())
    await tracked.dispatcher.accept(request)

    assert received_html(rig).strip() == HTML
    assert await stored_links(rig, request.send_id) is None


async def test_with_tracking_off_the_html_is_untouched(rig: Rig) -> None:
    request = rig.request(template=email())
    await rig.dispatcher.accept(request)  # the rig's dispatcher has no tracking

    assert received_html(rig).strip() == HTML
    assert await stored_links(rig, request.send_id) is None


async def test_an_email_without_html_is_not_tracked(rig: Rig, tracked: Tracked) -> None:
    request = rig.request()  # body only
    await tracked.dispatcher.accept(request)

    assert rig.smtp.messages[0].message.get_body(preferencelist=("html",)) is None
    assert await stored_links(rig, request.send_id) is None


async def test_links_are_stored_before_the_provider_is_called(rig: Rig, tracked: Tracked) -> None:
    """A reader may click before the SMTP reply arrives: the links must already be there."""
    request = rig.request(template=email())
    await tracked.dispatcher.record(request)
    [claimed] = await tracked.dispatcher.claim(request.send_id)
    attempting = await store.mark_attempting(rig.pool, claimed.send, timedelta(seconds=30), [SHOP])
    assert attempting is not None
    assert attempting.state == "attempting"
    token = make_token(TokenKind.CLICK, request.send_id, 0, SECRET)

    async with httpx.AsyncClient(follow_redirects=False) as client:
        response = await client.get(f"{tracked.base}/c/{token}")

    assert (response.status_code, response.headers["location"]) == (302, SHOP)


async def test_outcome_events_carry_the_experiment_group(rig: Rig) -> None:
    variant = rig.request(user="ann")
    variant.experiment_group = "wait-24h"
    legacy = rig.request(user="bob")  # planned before experiments: no group
    suppressed = rig.request(user="cid")
    suppressed.experiment_group = "treatment"
    await rig.identify("cid", {"email_subscribe": "unsubscribed"})
    for request in (variant, legacy, suppressed):
        await rig.dispatcher.accept(request)

    [sent_ann] = await rig.events("message.sent", "ann")
    [sent_bob] = await rig.events("message.sent", "bob")
    [suppressed_cid] = await rig.events("message.suppressed", "cid")
    assert sent_ann["properties"]["experiment_group"] == "wait-24h"
    assert sent_bob["properties"]["experiment_group"] == ""
    assert suppressed_cid["properties"]["experiment_group"] == "treatment"


async def test_failed_outcomes_carry_the_experiment_group(rig: Rig) -> None:
    request = rig.request(template={"to": "", "subject": "x", "body": "y"})
    request.experiment_group = "control-ish"
    await rig.dispatcher.accept(request)

    [failed] = await rig.events("message.failed")
    assert failed["properties"]["experiment_group"] == "control-ish"


async def test_global_control_is_stored_in_the_workspace_policy(rig: Rig) -> None:
    await rig.apply_policy({"global_control": {"percent": 5, "salt": " 2025 "}})

    stored = await rig.pool.fetchval(
        "SELECT policy->'global_control' FROM workspace_policies WHERE workspace_id = $1",
        WORKSPACE,
    )
    assert stored == {"percent": 5, "salt": "2025"}

    with pytest.raises(PolicyError) as error:
        await rig.apply_policy({"global_control": {"percent": 75}})
    assert error.value.path == "global_control.percent"
    still = await rig.pool.fetchval(
        "SELECT policy->'global_control' FROM workspace_policies WHERE workspace_id = $1",
        WORKSPACE,
    )
    assert still == {"percent": 5, "salt": "2025"}


async def test_the_unsubscribe_link_is_a_template_variable_and_never_tracked(
    rig: Rig, tracked: Tracked
) -> None:
    footer = '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
    template = email(HTML.replace("</body>", footer + "</body>")) | {
        "body": "Your cart is waiting. Unsubscribe: {{ unsubscribe_url }}"
    }
    marketing = rig.request(template=template)
    transactional = rig.request(kind="transactional", template=template)
    await tracked.dispatcher.accept(marketing)
    await tracked.dispatcher.accept(transactional)

    first, second = rig.smtp.messages
    header = str(first.message["List-Unsubscribe"])[1:-1]
    assert first.text == f"Your cart is waiting. Unsubscribe: {header}"
    shop, _, faq, unsubscribe = html_links(received_html(rig, 0)).hrefs
    assert unsubscribe == header  # as written: straight to the unsubscribe page
    assert shop.startswith(f"{tracked.base}/c/")
    assert faq.startswith(f"{tracked.base}/c/")
    assert header not in await stored_links(rig, marketing.send_id)
    # Transactional email has no unsubscribe link: the variable is empty.
    assert second.message["List-Unsubscribe"] is None
    assert second.text == "Your cart is waiting. Unsubscribe:"


async def test_a_preview_shows_a_placeholder_unsubscribe_link(rig: Rig) -> None:
    template = {"body": "Stop: {{ unsubscribe_url }}"}
    shown = {
        kind: await preview(
            rig.pool,
            workspace_id=WORKSPACE,
            user_id="ann",
            channel="email",
            kind=kind,
            template=template,
            context={},
        )
        for kind in ("marketing", "transactional")
    }
    # Not a working link: clicking it in a preview must not unsubscribe the user.
    assert shown["marketing"].fields["body"] == f"Stop: {PREVIEW_UNSUBSCRIBE_URL}"
    assert shown["transactional"].fields["body"] == "Stop: "
