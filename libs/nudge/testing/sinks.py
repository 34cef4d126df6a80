"""Real protocol peers for tests, the demo and the benchmark: an SMTP server and an HTTP server
that record what they receive (both on 127.0.0.1, each in its own thread)."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from aiosmtpd.controller import Controller

from nudge.dev.stack import free_port


@dataclass(frozen=True)
class HtmlLinks:
    """The `<a href>` and `<img src>` values of an HTML body, in document order."""

    hrefs: tuple[str, ...]
    images: tuple[str, ...]


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href"):
            self.hrefs.append(str(values["href"]))
        if tag == "img" and values.get("src"):
            self.images.append(str(values["src"]))


def html_links(html: str) -> HtmlLinks:
    """The links and image sources of an HTML document (what a mail client would fetch)."""
    parser = _LinkParser()
    parser.feed(html)
    parser.close()
    return HtmlLinks(tuple(parser.hrefs), tuple(parser.images))


@dataclass(frozen=True)
class ReceivedMail:
    """One message as the SMTP sink received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: email.message.EmailMessage
    received_monotonic: float

    @property
    def subject(self) -> str:
        """The Subject header."""
        return str(self.message["Subject"] or "")

    @property
    def text(self) -> str:
        """The text/plain body."""
        part = self.message.get_body(preferencelist=("plain",))
        return "" if part is None else str(part.get_content()).strip()

    @property
    def html(self) -> str:
        """The text/html body ("" when there is none)."""
        part = self.message.get_body(preferencelist=("html",))
        return "" if part is None else str(part.get_content())

    def links(self) -> HtmlLinks:
        """The links and images of the HTML body (tracked links, the open pixel)."""
        return html_links(self.html)


class _Recorder:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.items) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return list(self.items)


@dataclass(frozen=True)
class SmtpFault:
    """One misbehaviour of the SMTP sink, used up by one incoming message.

    `stage` "mail", "rcpt" or "data": answer that command with `reply` (e.g. "421 4.3.2 Busy",
    "550 5.1.1 No such user") instead of accepting. "lose_reply": accept and record the message,
    then drop the connection before the final reply (the provider has it; the sender cannot
    know). "close_after": accept, reply, then close the connection (a server dropping a client
    it considers idle)."""

    stage: Literal["mail", "rcpt", "data", "lose_reply", "close_after"]
    reply: str = ""


class SmtpSink:
    """An aiosmtpd server that accepts every message and records it, unless `faults` (a queue,
    consumed in order, one per message) tells it to misbehave."""

    def __init__(self, port: int | None = None, faults: Iterable[SmtpFault] = ()) -> None:
        self.port = port or free_port()
        self.faults: deque[SmtpFault] = deque(faults)
        self.sessions = 0
        """SMTP sessions (connections) that sent MAIL at least once."""
        self._recorder = _Recorder()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    def _fault(self, *stages: str) -> SmtpFault | None:
        if self.faults and self.faults[0].stage in stages:
            return self.faults.popleft()
        return None

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        """aiosmtpd hook: accept the sender unless a "mail" fault is due."""
        if not getattr(session, "nudge_counted", False):
            session.nudge_counted = True
            self.sessions += 1
        fault = self._fault("mail")
        if fault is not None:
            return fault.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        """aiosmtpd hook: accept the recipient unless a "rcpt" fault is due."""
        fault = self._fault("rcpt")
        if fault is not None:
            return fault.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    @property
    def url(self) -> str:
        """`smtp://127.0.0.1:<port>` for NUDGE_SMTP_URL."""
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """aiosmtpd hook: record the message (unless a "data" fault refuses it)."""
        fault = self._fault("data", "lose_reply", "close_after")
        if fault is not None and fault.stage == "data":
            return fault.reply
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        self._recorder.add(
            ReceivedMail(envelope.mail_from, tuple(envelope.rcpt_tos), message, time.monotonic())
        )
        if fault is not None and fault.stage == "lose_reply":  # the sender never hears it
            server.transport.close()
        elif fault is not None:  # close_after: once the reply is out
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
        return "250 OK"

    @property
    def messages(self) -> list[ReceivedMail]:
        """Everything received so far."""
        return list(self._recorder.items)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[ReceivedMail]:
        """Block until `count` messages arrived (or the timeout); return all received."""
        return self._recorder.wait_for(count, timeout_s)

    def start(self) -> SmtpSink:
        """Start serving."""
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._controller.stop()


@dataclass(frozen=True)
class ReceivedRequest:
    """One HTTP request as the HTTP sink received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_monotonic: float

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


Responder = Callable[[ReceivedRequest], tuple[int, dict[str, str], bytes] | None]


@dataclass
class HttpSink:
    """A threaded HTTP/1.1 server that records requests and answers with `responder`
    (200 `{}` by default). A responder returning None drops the connection without an answer
    (the request arrived; the client cannot know); one that sleeps makes a slow provider."""

    port: int = field(default_factory=free_port)
    responder: Responder | None = None

    def __post_init__(self) -> None:
        self._recorder = _Recorder()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = ReceivedRequest(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                    time.monotonic(),
                )
                sink._recorder.add(request)
                answer = sink.responder(request) if sink.responder else (200, {}, b"{}")
                if answer is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, headers, body = answer
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = _handle
            do_GET = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Everything received so far."""
        return list(self._recorder.items)

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[ReceivedRequest]:
        """Block until `count` requests arrived (or the timeout); return all received."""
        return self._recorder.wait_for(count, timeout_s)

    def webhook_ids(self) -> list[str]:
        """The `webhook-id` of every request received, in arrival order (a receiver that
        dedupes keeps the first of each)."""
        return [r.headers.get("webhook-id", "") for r in self._recorder.items]

    def start(self) -> HttpSink:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
