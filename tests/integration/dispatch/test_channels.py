"""Channels against real protocol peers on 127.0.0.1 (aiosmtpd, hand-written HTTP/SMTP peers)."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from nudge.testing.sinks import SmtpFault, SmtpSink
from services.dispatch.channels import (
    AmbiguousChannelError,
    Channel,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
)
from services.dispatch.channels import email as email_channel
from services.dispatch.channels.console import ConsoleChannel
from services.dispatch.channels.email import SmtpChannel
from services.dispatch.channels.webhook import (
    WebhookChannel,
    is_public_address,
    parse_retry_after,
    workspace_secret,
)

LOCALHOST = "127.0.0.1"
SEND_ID = "3f1c7a52-2b7e-5d3c-9a41-0c2f8e6d1b11"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def message(channel: str, **fields: str) -> OutboundMessage:
    return OutboundMessage(
        send_id=SEND_ID,
        workspace_id="acme",
        user_id="u1",
        channel=channel,
        fields=fields,
        traceparent=TRACEPARENT,
    )


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LoopbackServers:
    """asyncio servers on 127.0.0.1 whose open connections are cancelled at teardown."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self, handler: StreamHandler, tls: ssl.SSLContext | None = None) -> int:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            try:
                await handler(reader, writer)
            finally:
                self._connections.discard(task)
                # A cancelled handler must not leave its transport for the garbage collector
                # to find after the test's loop closed (an unraisable warning in a later test).
                writer.transport.abort()

        server = await asyncio.start_server(tracked, LOCALHOST, 0, ssl=tls)
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()


@pytest.fixture
async def loopback() -> AsyncIterator[LoopbackServers]:
    servers = LoopbackServers()
    yield servers
    await servers.stop()


# --------------------------------------------------------------------------------------- SMTP


@dataclass
class RecordingHandler:
    """aiosmtpd handler; `mail_reply` / `rcpt_reply` / `data_reply` override the 250s."""

    mail_reply: str | None = None
    rcpt_reply: str | None = None
    data_reply: str = "250 2.0.0 Ok: queued as Q123"
    envelopes: list[Envelope] = field(default_factory=list)

    async def handle_MAIL(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return self.data_reply


@pytest.fixture
def smtp_peer() -> Iterator[tuple[RecordingHandler, int]]:
    handler = RecordingHandler()
    port = free_port()
    controller = Controller(handler, hostname=LOCALHOST, port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


_OPEN_CHANNELS: list[SmtpChannel] = []


@pytest.fixture(autouse=True)
async def _close_smtp_channels() -> AsyncIterator[None]:
    """Close the channels a test made (they keep idle connections open for reuse)."""
    yield
    while _OPEN_CHANNELS:
        await _OPEN_CHANNELS.pop().aclose()


def smtp_channel(port: int, timeout_s: float = 5) -> SmtpChannel:
    channel = SmtpChannel(
        f"smtp://{LOCALHOST}:{port}",
        "Nudge <noreply@nudge.test>",
        message_id_domain="mail.nudge.test",
        timeout_s=timeout_s,
        local_hostname="dispatch.nudge.test",
    )
    _OPEN_CHANNELS.append(channel)
    return channel


def email_message(**overrides: str) -> OutboundMessage:
    fields = {
        "to": "Ann Example <ann@example.test>",
        "subject": "Grüße, Ann",
        "body": "Hello Ann\n.leading dot line\nbye\n",
        "html": "<p>Hello <b>Ann</b></p>",
    }
    fields.update(overrides)
    return message("email", **{k: v for k, v in fields.items() if v is not None})


async def test_smtp_delivers_mime_message_with_ids(smtp_peer: tuple[RecordingHandler, int]) -> None:
    handler, port = smtp_peer
    channel = smtp_channel(port)
    assert channel.supports_idempotency is False

    delivery = await channel.send(email_message())

    assert delivery.provider_message_id == f"<{SEND_ID}@mail.nudge.test>"
    assert delivery.detail.startswith("250")
    assert "Q123" in delivery.detail
    [envelope] = handler.envelopes
    assert envelope.mail_from == "noreply@nudge.test"
    assert envelope.rcpt_tos == ["ann@example.test"]
    assert isinstance(envelope.original_content, bytes)
    received = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert isinstance(received, EmailMessage)
    assert received["Message-ID"] == f"<{SEND_ID}@mail.nudge.test>"
    assert received["X-Nudge-Send-Id"] == SEND_ID
    assert received["From"] == "Nudge <noreply@nudge.test>"
    assert received["To"] == "Ann Example <ann@example.test>"
    assert received["Subject"] == "Grüße, Ann"
    assert received["Date"]
    assert received.get_content_type() == "multipart/alternative"
    plain = received.get_body(preferencelist=("plain",))
    html = received.get_body(preferencelist=("html",))
    assert plain is not None
    assert html is not None
    assert plain.get_content().replace("\r\n", "\n") == "Hello Ann\n.leading dot line\nbye\n"
    assert html.get_content().strip() == "<p>Hello <b>Ann</b></p>"


async def test_smtp_text_only_and_template_from(smtp_peer: tuple[RecordingHandler, int]) -> None:
    handler, port = smtp_peer
    await smtp_channel(port).send(
        email_message(html="", **{"from": "Campaigns <hello@nudge.test>"})
    )
    [envelope] = handler.envelopes
    assert isinstance(envelope.original_content, bytes)
    received = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert received.get_content_type() == "text/plain"
    assert received["From"] == "Campaigns <hello@nudge.test>"
    assert envelope.mail_from == "noreply@nudge.test"


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("mail_reply", "421 4.3.2 Service shutting down"),
        ("rcpt_reply", "450 4.2.1 Mailbox busy"),
        ("data_reply", "451 4.3.0 Try again later"),
    ],
)
async def test_smtp_4xx_is_transient(
    smtp_peer: tuple[RecordingHandler, int], stage: str, reply: str
) -> None:
    handler, port = smtp_peer
    setattr(handler, stage, reply)
    with pytest.raises(TransientChannelError) as caught:
        await smtp_channel(port).send(email_message())
    assert caught.value.retryable is True
    assert reply.split()[0] in caught.value.reason


async def test_smtp_recipient_refused_is_permanent(
    smtp_peer: tuple[RecordingHandler, int],
) -> None:
    handler, port = smtp_peer
    handler.rcpt_reply = "550 5.1.1 Mailbox unavailable"
    with pytest.raises(PermanentChannelError) as caught:
        await smtp_channel(port).send(email_message())
    assert caught.value.retryable is False
    assert "recipient" in caught.value.reason
    assert "550" in caught.value.reason
    assert "Mailbox unavailable" in caught.value.reason
    assert handler.envelopes == []


async def test_smtp_content_rejected_is_permanent(smtp_peer: tuple[RecordingHandler, int]) -> None:
    handler, port = smtp_peer
    handler.data_reply = "554 5.7.1 Message rejected as spam"
    with pytest.raises(PermanentChannelError, match="554"):
        await smtp_channel(port).send(email_message())


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        ("", "missing address"),
        ("   ", "missing address"),
        ("a@example.test, b@example.test", "exactly one"),
        ("not-an-address", "invalid recipient"),
    ],
)
async def test_smtp_unusable_recipient_is_permanent_before_connecting(
    smtp_peer: tuple[RecordingHandler, int], to: str, reason: str
) -> None:
    handler, port = smtp_peer
    with pytest.raises(PermanentChannelError, match=reason):
        await smtp_channel(port).send(email_message(to=to))
    assert handler.envelopes == []


async def test_smtp_header_injection_is_refused(smtp_peer: tuple[RecordingHandler, int]) -> None:
    handler, port = smtp_peer
    with pytest.raises(PermanentChannelError, match="invalid message"):
        await smtp_channel(port).send(email_message(subject="Hi\r\nBcc: victim@example.test"))
    assert handler.envelopes == []


async def test_smtp_connection_refused_is_transient() -> None:
    with pytest.raises(TransientChannelError, match="connect"):
        await smtp_channel(free_port()).send(email_message())


def test_smtp_url_schemes() -> None:
    assert SmtpChannel("smtps://u:p%40ss@mail.test", "a@b.test")._port == 465
    starttls = SmtpChannel("smtp+starttls://mail.test", "a@b.test")
    assert (starttls._port, starttls._start_tls, starttls._use_tls) == (587, True, False)
    with pytest.raises(ValueError, match="scheme"):
        SmtpChannel("http://mail.test", "a@b.test")


@dataclass
class ScriptedSmtpPeer:
    """A minimal SMTP server that misbehaves at one chosen point of the transaction."""

    misbehave: str  # "close-at-data" | "close-after-content" | "stall-after-content"
    contents: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 scripted ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-scripted\r\n250 8BITMIME\r\n")
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 OK\r\n")
                elif verb == b"DATA":
                    if self.misbehave == "close-at-data":
                        return
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    self.contents.append(await reader.readuntil(b"\r\n.\r\n"))
                    if self.misbehave == "close-after-content":
                        return
                    await asyncio.sleep(30)
                    return
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"502 unknown\r\n")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def scripted_server(
    loopback: LoopbackServers,
) -> Callable[[str], Awaitable[tuple[ScriptedSmtpPeer, int]]]:
    async def start(misbehave: str) -> tuple[ScriptedSmtpPeer, int]:
        peer = ScriptedSmtpPeer(misbehave)
        return peer, await loopback.start(peer.handle)

    return start


async def test_smtp_disconnect_after_content_is_ambiguous(
    scripted_server: Callable[[str], Awaitable[tuple[ScriptedSmtpPeer, int]]],
) -> None:
    peer, port = await scripted_server("close-after-content")
    with pytest.raises(AmbiguousChannelError) as caught:
        await smtp_channel(port).send(email_message())
    assert caught.value.retryable is False
    assert len(peer.contents) == 1
    assert b"Message-ID" in peer.contents[0]


async def test_smtp_timeout_after_content_is_ambiguous(
    scripted_server: Callable[[str], Awaitable[tuple[ScriptedSmtpPeer, int]]],
) -> None:
    peer, port = await scripted_server("stall-after-content")
    with pytest.raises(AmbiguousChannelError, match="no reply after message content"):
        await smtp_channel(port, timeout_s=0.5).send(email_message())
    assert len(peer.contents) == 1


async def test_smtp_disconnect_before_content_is_transient(
    scripted_server: Callable[[str], Awaitable[tuple[ScriptedSmtpPeer, int]]],
) -> None:
    peer, port = await scripted_server("close-at-data")
    with pytest.raises(TransientChannelError):
        await smtp_channel(port).send(email_message())
    assert peer.contents == []


# ------------------------------------------------------------------------------------ webhook


@dataclass
class HttpRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


Responder = Callable[[HttpRequest], Awaitable[bytes | None]]


@dataclass
class HttpPeer:
    """HTTP/1.1 on asyncio streams: one request per connection, `responder` picks the answer."""

    responder: Responder
    requests: list[HttpRequest] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ", 2)
            headers = {}
            for header_line in header_lines:
                if header_line:
                    name, value = header_line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = HttpRequest(method, target, headers, body)
            self.requests.append(request)
            answer = await self.responder(request)
            if answer is not None:
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def http_response(status: int, *headers: str, body: bytes = b"") -> Responder:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close", *headers]
    raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def respond(_request: HttpRequest) -> bytes:
        return raw

    return respond


async def hang_up(_request: HttpRequest) -> None:
    return None


async def stall(_request: HttpRequest) -> None:
    await asyncio.sleep(30)


HttpServer = Callable[[Responder], Awaitable[tuple[HttpPeer, int]]]


@pytest.fixture
def http_server(loopback: LoopbackServers) -> HttpServer:
    async def start(responder: Responder) -> tuple[HttpPeer, int]:
        peer = HttpPeer(responder)
        return peer, await loopback.start(peer.handle)

    return start


SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.fixture
async def webhook() -> AsyncIterator[Callable[..., WebhookChannel]]:
    channels: list[WebhookChannel] = []

    def make(*allow: str, timeout_s: float = 5, **kwargs: Any) -> WebhookChannel:
        channel = WebhookChannel(SECRET, timeout_s=timeout_s, allow_private_hosts=allow, **kwargs)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.aclose()


async def test_webhook_delivers_signed_json(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel]
) -> None:
    peer, port = await http_server(http_response(202, body=b"accepted"))
    channel = webhook(f"{LOCALHOST}:{port}")
    assert channel.supports_idempotency is True
    payload = '{"event": "cart_abandoned", "name": "Zoë"}'

    delivery = await channel.send(
        message("webhook", url=f"http://{LOCALHOST}:{port}/hooks/nudge?x=1", payload=payload)
    )

    assert delivery.detail == "http 202: accepted"
    [request] = peer.requests
    assert (request.method, request.target) == ("POST", "/hooks/nudge?x=1")
    assert request.body.decode() == payload
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == f"{LOCALHOST}:{port}"
    assert request.headers["webhook-id"] == SEND_ID
    assert request.headers["idempotency-key"] == SEND_ID
    assert request.headers["traceparent"] == TRACEPARENT
    verified = Webhook(workspace_secret(SECRET, "acme")).verify(request.body, request.headers)
    assert verified == {"event": "cart_abandoned", "name": "Zoë"}


async def test_webhook_default_envelope(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel]
) -> None:
    peer, port = await http_server(http_response(200))
    url = f"http://{LOCALHOST}:{port}/"
    await webhook(LOCALHOST).send(message("webhook", url=url, title="Hi", body="Come back"))
    [request] = peer.requests
    assert Webhook(workspace_secret(SECRET, "acme")).verify(request.body, request.headers) == {
        "send_id": SEND_ID,
        "user_id": "u1",
        "message": {"title": "Hi", "body": "Come back"},
    }


@pytest.mark.parametrize(
    ("responder", "retry_after_s"),
    [
        (http_response(500), None),
        (http_response(503, "Retry-After: 0"), 0.0),
        (http_response(429, "Retry-After: 5"), 5.0),
        (http_response(408), None),
    ],
)
async def test_webhook_retryable_statuses_are_transient(
    http_server: HttpServer,
    webhook: Callable[..., WebhookChannel],
    responder: Responder,
    retry_after_s: float | None,
) -> None:
    _peer, port = await http_server(responder)
    with pytest.raises(TransientChannelError) as caught:
        await webhook(LOCALHOST).send(message("webhook", url=f"http://{LOCALHOST}:{port}/"))
    assert caught.value.retryable is True
    assert caught.value.retry_after_s == retry_after_s


async def test_webhook_retry_after_http_date(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel]
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    _peer, port = await http_server(http_response(503, f"Retry-After: {when}"))
    with pytest.raises(TransientChannelError) as caught:
        await webhook(LOCALHOST).send(message("webhook", url=f"http://{LOCALHOST}:{port}/"))
    assert caught.value.retry_after_s is not None
    assert 100 < caught.value.retry_after_s <= 120


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("-3", now=now) is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_webhook_client_errors_are_permanent(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel], status: int
) -> None:
    _peer, port = await http_server(http_response(status, body=b'{"error":"bad"}'))
    with pytest.raises(PermanentChannelError) as caught:
        await webhook(LOCALHOST).send(message("webhook", url=f"http://{LOCALHOST}:{port}/"))
    assert caught.value.retryable is False
    assert str(status) in caught.value.reason
    assert "bad" in caught.value.reason


async def test_webhook_redirect_is_not_followed(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel]
) -> None:
    canary, canary_port = await http_server(http_response(200))
    _peer, port = await http_server(
        http_response(302, f"Location: http://{LOCALHOST}:{canary_port}/internal")
    )
    with pytest.raises(PermanentChannelError, match="redirect"):
        await webhook(f"{LOCALHOST}:{port}").send(
            message("webhook", url=f"http://{LOCALHOST}:{port}/")
        )
    assert canary.connections == 0


async def test_webhook_hang_up_after_request_is_ambiguous(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel]
) -> None:
    peer, port = await http_server(hang_up)
    with pytest.raises(AmbiguousChannelError) as caught:
        await webhook(LOCALHOST).send(message("webhook", url=f"http://{LOCALHOST}:{port}/"))
    assert caught.value.retryable is True
    assert len(peer.requests) == 1


async def test_webhook_read_timeout_is_ambiguous(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel]
) -> None:
    peer, port = await http_server(stall)
    with pytest.raises(AmbiguousChannelError, match="ReadTimeout"):
        await webhook(LOCALHOST, timeout_s=0.5).send(
            message("webhook", url=f"http://{LOCALHOST}:{port}/")
        )
    assert len(peer.requests) == 1


async def test_webhook_connection_refused_is_transient(
    webhook: Callable[..., WebhookChannel],
) -> None:
    port = free_port()
    with pytest.raises(TransientChannelError, match="connect"):
        await webhook(LOCALHOST).send(message("webhook", url=f"http://{LOCALHOST}:{port}/"))


async def test_webhook_invalid_payload_is_permanent_and_not_sent(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel]
) -> None:
    peer, port = await http_server(http_response(200))
    with pytest.raises(PermanentChannelError, match="not valid JSON"):
        await webhook(LOCALHOST).send(
            message("webhook", url=f"http://{LOCALHOST}:{port}/", payload='{"name": "Ann"')
        )
    assert peer.connections == 0


async def test_webhook_missing_url_is_permanent(webhook: Callable[..., WebhookChannel]) -> None:
    with pytest.raises(PermanentChannelError, match="missing address"):
        await webhook().send(message("webhook", url=" "))


async def test_webhook_tries_next_vetted_address_when_connect_fails(
    http_server: HttpServer,
    webhook: Callable[..., WebhookChannel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peer, port = await http_server(http_response(200))
    channel = webhook("multi.test")

    async def two_addresses(host: str, port: int) -> list[IPv4Address]:
        assert host == "multi.test"
        return [IPv4Address("127.0.0.2"), IPv4Address(LOCALHOST)]

    monkeypatch.setattr(channel, "_resolve", two_addresses)
    await channel.send(message("webhook", url=f"http://multi.test:{port}/"))
    [request] = peer.requests
    assert request.headers["host"] == f"multi.test:{port}"


@pytest.fixture
def localhost_certificate(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_webhook_https_keeps_host_name_for_tls_while_pinned_to_address(
    loopback: LoopbackServers,
    webhook: Callable[..., WebhookChannel],
    localhost_certificate: tuple[Path, Path],
) -> None:
    cert, key = localhost_certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    peer = HttpPeer(http_response(200))
    port = await loopback.start(peer.handle, tls=server_tls)
    client_tls = ssl.create_default_context(cafile=str(cert))
    channel = webhook("localhost", LOCALHOST, transport=httpx.AsyncHTTPTransport(verify=client_tls))

    await channel.send(message("webhook", url=f"https://localhost:{port}/secure"))
    [request] = peer.requests
    assert request.headers["host"] == f"localhost:{port}"

    with pytest.raises(
        TransientChannelError, match=r"CERTIFICATE_VERIFY_FAILED|IP address mismatch"
    ):
        await channel.send(message("webhook", url=f"https://{LOCALHOST}:{port}/secure"))


class RefuseEveryRequest(httpx.AsyncBaseTransport):
    """Stands in for the network: a request reaching it means the guard let it through."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raise httpx.ConnectError("test transport never connects", request=request)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://192.168.1.1:8080/",
        "http://100.64.0.1/",
        "http://[fd00::1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://[64:ff9b::a00:1]/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "file:///etc/passwd",
        "gopher://example.test/",
        "ftp://example.test/",
        "http:///nohost",
    ],
)
async def test_webhook_ssrf_guard_refuses_before_any_connection(
    webhook: Callable[..., WebhookChannel], url: str
) -> None:
    transport = RefuseEveryRequest()
    with pytest.raises(PermanentChannelError, match="blocked destination"):
        await webhook(LOCALHOST, transport=transport).send(message("webhook", url=url))
    assert transport.requests == []


async def test_webhook_ssrf_guard_refuses_loopback_not_allow_listed(
    http_server: HttpServer, webhook: Callable[..., WebhookChannel]
) -> None:
    canary, canary_port = await http_server(http_response(200))
    _sink, sink_port = await http_server(http_response(200))
    channel = webhook(f"{LOCALHOST}:{sink_port}")
    for url in (
        f"http://localhost:{canary_port}/",
        f"http://{LOCALHOST}:{canary_port}/",
        f"http://127.0.0.2:{canary_port}/",
        f"http://[::1]:{canary_port}/",
        f"http://LOCALHOST:{canary_port}/",
    ):
        with pytest.raises(PermanentChannelError, match="blocked destination"):
            await channel.send(message("webhook", url=url))
    assert canary.connections == 0
    await channel.send(message("webhook", url=f"http://{LOCALHOST}:{sink_port}/"))


def test_public_address_classification() -> None:
    assert is_public_address(ip_address("93.184.215.14"))
    assert is_public_address(ip_address("2606:4700::6810:84e5"))
    for private in (
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "2002:a00:1::",
        "ff02::1",
        "255.255.255.255",
    ):
        assert not is_public_address(ip_address(private)), private


def test_webhook_secret_is_checked_strictly() -> None:
    for bad in ("not-prefixed", "whsec_***notbase64***", "whsec_"):
        with pytest.raises(ValueError, match="webhook secret"):
            WebhookChannel(bad)


# ------------------------------------------------------------------------------------ console


async def test_console_prints_one_json_line() -> None:
    stream = io.StringIO()
    channel: Channel = ConsoleChannel(stream)
    delivery = await channel.send(message("console", subject="Hi", body="line1\nline2"))
    await channel.aclose()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    printed = json.loads(lines[0])
    assert printed["send_id"] == SEND_ID
    assert printed["fields"] == {"subject": "Hi", "body": "line1\nline2"}
    assert delivery.provider_message_id == SEND_ID


def test_channels_satisfy_protocol() -> None:
    channels: list[Channel] = [
        ConsoleChannel(),
        SmtpChannel("smtp://127.0.0.1:25", "a@b.test"),
    ]
    assert [c.name for c in channels] == ["console", "email"]


async def test_webhook_total_deadline_bounds_a_dripping_receiver(
    loopback: LoopbackServers, webhook: Callable[..., WebhookChannel]
) -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(100):
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    port = await loopback.start(drip)
    channel = webhook(LOCALHOST, timeout_s=0.3, total_timeout_s=0.6)
    with pytest.raises(AmbiguousChannelError, match="total") as caught:
        await channel.send(message("webhook", url=f"http://{LOCALHOST}:{port}/"))
    assert caught.value.retryable is True


def test_each_workspace_signs_with_its_own_secret_derived_from_the_master() -> None:
    acme = workspace_secret(SECRET, "acme")
    assert acme.startswith("whsec_")
    assert acme == workspace_secret(SECRET, "acme")
    assert acme != workspace_secret(SECRET, "globex")
    other_master = "whsec_" + base64.b64encode(b"1" * 24).decode()
    assert acme != workspace_secret(other_master, "acme")
    channel = WebhookChannel(SECRET)
    now = datetime.now(UTC)
    headers = channel.signed_headers("globex", SEND_ID, "{}", now)
    with pytest.raises(WebhookVerificationError):
        Webhook(acme).verify(b"{}", headers)
    assert Webhook(workspace_secret(SECRET, "globex")).verify(b"{}", headers) == {}


# --- SMTP connection reuse ---------------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    peer = SmtpSink().start()
    yield peer
    peer.stop()


def numbered(n: int) -> OutboundMessage:
    return email_message(subject=f"Message {n}")


async def test_a_stream_of_mail_uses_one_connection(sink: SmtpSink) -> None:
    channel = smtp_channel(sink.port)
    for n in range(3):
        await channel.send(numbered(n))
    assert [m.subject for m in sink.messages] == ["Message 0", "Message 1", "Message 2"]
    assert sink.sessions == 1
    # Concurrent sends each need a connection; afterwards they are reused, not reopened.
    await asyncio.gather(*(channel.send(numbered(n)) for n in range(3, 6)))
    before = sink.sessions
    await asyncio.gather(*(channel.send(numbered(n)) for n in range(6, 9)))
    assert sink.sessions == before
    assert len(sink.messages) == 9


async def test_an_idle_connection_the_server_closed_is_replaced_without_a_duplicate(
    sink: SmtpSink,
) -> None:
    channel = smtp_channel(sink.port)
    sink.faults.append(SmtpFault("close_after"))
    await channel.send(numbered(0))
    await asyncio.sleep(0.2)  # the server has closed the idle connection
    await channel.send(numbered(1))
    assert [m.subject for m in sink.messages] == ["Message 0", "Message 1"]
    assert sink.sessions == 2


async def test_a_421_on_a_reused_connection_retries_on_a_fresh_one(sink: SmtpSink) -> None:
    channel = smtp_channel(sink.port)
    await channel.send(numbered(0))
    sink.faults.append(SmtpFault("mail", "421 4.4.2 Idle too long, closing"))
    await channel.send(numbered(1))
    assert [m.subject for m in sink.messages] == ["Message 0", "Message 1"]
    assert sink.sessions == 2


async def test_a_421_on_a_fresh_connection_is_a_transient_failure(sink: SmtpSink) -> None:
    sink.faults.append(SmtpFault("mail", "421 4.3.2 Busy"))
    with pytest.raises(TransientChannelError, match="421"):
        await smtp_channel(sink.port).send(numbered(0))
    assert sink.messages == []


async def test_a_connection_that_saw_a_refusal_is_not_reused(sink: SmtpSink) -> None:
    channel = smtp_channel(sink.port)
    sink.faults.append(SmtpFault("rcpt", "550 5.7.1 Policy"))
    with pytest.raises(PermanentChannelError):
        await channel.send(numbered(0))
    await channel.send(numbered(1))
    assert [m.subject for m in sink.messages] == ["Message 1"]
    assert sink.sessions == 2


async def test_connections_idle_too_long_are_not_reused(
    sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(email_channel, "IDLE_TIMEOUT_S", 0.0)
    channel = smtp_channel(sink.port)
    await channel.send(numbered(0))
    await channel.send(numbered(1))
    assert sink.sessions == 2


async def test_smtp_headers_survive_non_ascii_and_long_values(sink: SmtpSink) -> None:
    subject = "Grüße aus Köln — " + "ein sehr langer Betreff " * 12
    long_ascii = "An ASCII subject " * 20
    channel = smtp_channel(sink.port)
    await channel.send(
        email_message(to="Jürgen Groß <juergen@example.test>", subject=subject.strip())
    )
    await channel.send(email_message(subject=long_ascii.strip(), html=""))
    first, second = sink.messages
    assert first.message["To"] == "Jürgen Groß <juergen@example.test>"
    assert first.subject == subject.strip()
    assert second.subject == long_ascii.strip()
    assert first.message.get_body(preferencelist=("html",)) is not None
    assert second.message.get_content_type() == "text/plain"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"from": "not an address"}, "invalid sender"),
        ({"from": "a@example.test, b@example.test"}, "exactly one"),
        ({"from": "Evil\r\nBcc: x@example.test <a@example.test>"}, "invalid"),
        ({"subject": "Hi\nBcc: victim@example.test"}, "line break"),
        ({"subject": "Hi\x00there"}, "line break"),
    ],
)
async def test_smtp_refuses_unusable_headers_before_connecting(
    sink: SmtpSink, fields: dict[str, str], reason: str
) -> None:
    with pytest.raises(PermanentChannelError, match=reason):
        await smtp_channel(sink.port).send(email_message(**fields))
    assert sink.sessions == 0
