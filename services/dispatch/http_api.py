"""The public HTTP endpoint of dispatch: one-click unsubscribe (RFC 8058), open and click
tracking.

    GET  /unsubscribe?token=T   a page with a confirm button (GET never unsubscribes: mail
                                scanners and link previewers fetch every link they see)
    POST /unsubscribe?token=T   unsubscribes; the body is `List-Unsubscribe=One-Click` when a
                                mail client does it (RFC 8058), or the confirm form's
    GET|HEAD /o/T               the open pixel: records `message.opened`, always answers the GIF
    GET  /c/T                   a click: records `message.clicked`, 302 to the link's URL
    GET  /healthz               200

A small HTTP/1.1 server on h11 (already a dependency through httpx): one request per
connection, bodies up to 8 KiB, 10 s per connection. Put a TLS-terminating proxy in front: the
`List-Unsubscribe` URL must be HTTPS for one-click unsubscribe to be offered by mail clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit

import asyncpg
import h11

from services.dispatch import tracking
from services.dispatch.application import Tracker, TrackingConfig, Unsubscriber
from services.dispatch.settings import Settings
from services.dispatch.tracking import PIXEL_GIF, InvalidTrackingTokenError
from services.dispatch.unsubscribe import InvalidTokenError, UnsubscribeLinks, derive_secret

log = logging.getLogger("nudge.dispatch.http")

MAX_BODY_BYTES: Final = 8 * 1024
CONNECTION_TIMEOUT_S: Final = 10.0
_READ_CHUNK: Final = 16 * 1024


_DB_ERRORS: Final = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True)
class Response:
    status: int
    body: str | bytes
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _page(title: str, text: str, form_token: str | None = None) -> str:
    form = ""
    if form_token is not None:
        form = (
            '<form method="post" action="/unsubscribe?token='
            f'{html.escape(form_token, quote=True)}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        '<meta name="robots" content="noindex"></head>'
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{form}</body></html>"
    )


_NOT_FOUND: Final = Response(404, _page("Not found", "There is nothing here."))
_PIXEL: Final = Response(200, PIXEL_GIF, "image/gif")


class PublicApp:
    """Routes a request to a response; no I/O but the unsubscriber's and the tracker's.

    The tracker answers even while tracking is off for new mail (NUDGE_TRACKING_URL unset), so
    links in mail sent before still work; only an app without one answers 404 there.
    """

    def __init__(self, unsubscriber: Unsubscriber, tracker: Tracker | None = None) -> None:
        self._unsubscriber = unsubscriber
        self._tracker = tracker

    async def handle(self, method: str, target: str, body: bytes) -> Response:
        parts = urlsplit(target)
        if parts.path == "/healthz" and method in ("GET", "HEAD"):
            return Response(200, "ok", "text/plain; charset=utf-8")
        if self._tracker is not None and parts.path.startswith(("/o/", "/c/")):
            return await self._track(self._tracker, method, parts.path)
        if parts.path != "/unsubscribe":
            return _NOT_FOUND
        return await self._unsubscribe(method, parts.query)

    async def _track(self, tracker: Tracker, method: str, path: str) -> Response:
        token = path[3:]
        if path.startswith("/o/"):
            if method not in ("GET", "HEAD"):
                return Response(405, _page("Method not allowed", "Use GET."))
            # Whatever happens, the reader's mail shows a (transparent) image, never a broken
            # one: a bad token or a database error only means nothing is recorded.
            try:
                await tracker.opened(token)
            except _DB_ERRORS as error:
                log.warning("open not recorded: %r", error)
            return _PIXEL
        if method != "GET":  # a HEAD is a link checker, not a reader: no click, no redirect
            return Response(405, _page("Method not allowed", "Use GET."))
        try:
            url = await tracker.clicked(token)
        except InvalidTrackingTokenError:
            # Never a redirect for a token we cannot vouch for (no open redirect).
            return Response(404, _page("Link not found", "This link is not valid."))
        except _DB_ERRORS as error:
            log.warning("click lookup failed: %r", error)
            return Response(503, _page("Try again", "We could not open this link right now."))
        return Response(
            302,
            _page("Redirecting", url),
            headers=(("location", url), ("referrer-policy", "no-referrer")),
        )

    async def _unsubscribe(self, method: str, query: str) -> Response:
        if method not in ("GET", "POST"):
            return Response(405, _page("Method not allowed", "Use GET or POST."))
        tokens = parse_qs(query).get("token", [])
        if len(tokens) != 1:
            return Response(400, _page("Invalid link", "This unsubscribe link is incomplete."))
        try:
            request = self._unsubscriber.verify(tokens[0])
        except InvalidTokenError:
            return Response(400, _page("Invalid link", "This unsubscribe link is not valid."))
        if method == "GET":
            return Response(
                200,
                _page(
                    "Unsubscribe",
                    f"Stop receiving {request.channel} messages like this one?",
                    form_token=tokens[0],
                ),
            )
        # RFC 8058 §3.2: the POST body carries `List-Unsubscribe=One-Click`; the form sends the
        # same. Anything else still unsubscribes: the signed token is the authorization.
        try:
            await self._unsubscriber.unsubscribe(request)
        except _DB_ERRORS as error:
            log.warning("unsubscribe failed: %r", error)
            return Response(503, _page("Try again", "We could not record this right now."))
        log.info("unsubscribed %s from %s", request.user_id, request.channel)
        return Response(
            200, _page("Unsubscribed", f"You will no longer receive {request.channel} messages.")
        )


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[str, str, bytes] | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(_READ_CHUNK)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError("body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return (
                request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace"),
                bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _write(
    conn: h11.Connection, writer: asyncio.StreamWriter, response: Response, *, head: bool = False
) -> None:
    body = response.body
    payload = body.encode("utf-8") if isinstance(body, str) else body
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(payload))),
        ("cache-control", "no-store"),
        ("connection", "close"),
        *response.headers,
    ]
    writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
    if not head:  # a response to HEAD has the headers of GET's and no body
        writer.write(conn.send(h11.Data(data=payload)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


async def _serve_connection(
    app: PublicApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY_BYTES)
    try:
        async with asyncio.timeout(CONNECTION_TIMEOUT_S):
            try:
                request = await _read_request(conn, reader)
            except h11.RemoteProtocolError as error:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = error.error_status_hint
                    await _write(conn, writer, Response(status, _page("Bad request", "")))
                return
            if request is None:
                return
            response = await app.handle(*request)
            await _write(conn, writer, response, head=request[0] == "HEAD")
    except (TimeoutError, ConnectionError, h11.LocalProtocolError):
        pass
    except Exception:
        log.exception("public endpoint failed")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def start_http_server(address: str, app: PublicApp) -> asyncio.Server:
    """Listen on `host:port`; close the returned server to stop."""
    host, _, port = address.rpartition(":")
    return await asyncio.start_server(
        lambda reader, writer: _serve_connection(app, reader, writer),
        host.strip("[]") or "127.0.0.1",
        int(port),
    )


def unsubscribe_links(settings: Settings) -> UnsubscribeLinks:
    """Links signed with NUDGE_UNSUBSCRIBE_SECRET (or a key derived from the webhook secret),
    pointing at NUDGE_UNSUBSCRIBE_URL (or this server's /unsubscribe)."""
    secret = (
        settings.unsubscribe_secret.encode("utf-8")
        if settings.unsubscribe_secret
        else derive_secret(settings.webhook_secret)
    )
    base_url = settings.unsubscribe_url or f"http://{settings.http_address}/unsubscribe"
    return UnsubscribeLinks(secret, base_url)


def tracking_secret(settings: Settings) -> bytes:
    """NUDGE_TRACKING_SECRET, or a key derived from the webhook secret (independent of the
    unsubscribe key derived from the same material)."""
    if settings.tracking_secret:
        return settings.tracking_secret.encode("utf-8")
    return tracking.derive_secret(settings.webhook_secret)


def tracking_config(settings: Settings) -> TrackingConfig | None:
    """Tracking of new mail, pointing at NUDGE_TRACKING_URL; None (off) while it is unset."""
    if settings.tracking_url is None:
        return None
    return TrackingConfig(settings.tracking_url, tracking_secret(settings))
