"""Email over SMTP (aiosmtplib), reusing idle connections.

A connection is opened (connect, TLS, EHLO, AUTH) only when no idle one is at hand; after a
message is accepted the connection goes back to the idle set instead of QUIT, so a stream of
mail costs one MAIL/RCPT/DATA exchange per message. That is how SMTP submission is meant to be
used, and on this machine it halves the CPU of an email (docs/benchmarks.md). An idle
connection may have been closed by the server meanwhile (servers drop idle clients after a
timeout): if MAIL FROM on it fails for the transport or with 421, nothing of the message was
sent, so the message goes out on a fresh connection. A connection that saw any other error is
closed, never reused.
"""

from __future__ import annotations

import re
import ssl
import time
from datetime import UTC, datetime
from email import charset as email_charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, formataddr, getaddresses, parseaddr
from typing import Final
from urllib.parse import unquote, urlsplit

import aiosmtplib

from services.dispatch.channels.base import (
    AmbiguousChannelError,
    ChannelError,
    Delivery,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
    UndeliverableAddressError,
)

_SCHEMES: Final = {
    # scheme: (implicit TLS, STARTTLS, default port)
    "smtp": (False, False, 25),
    "smtps": (True, False, 465),
    "smtp+starttls": (False, True, 587),
}
_ADDR_SPEC: Final = re.compile(r"^[^\s@<>()\[\],;:\\\"]+@[^\s@<>()\[\],;:\\\"]+$")
_LINE_ENDINGS: Final = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT: Final = re.compile(rb"(?m)^\.")
_ENHANCED_STATUS: Final = re.compile(r"^([245])\.(\d{1,3})\.\d{1,3}\b")
_DATA_START: Final = 354
_COMPLETED: Final = 250
_WILL_FORWARD: Final = 251
_CLOSING: Final = 421
MAX_IDLE_CONNECTIONS: Final = 8
IDLE_TIMEOUT_S: Final = 30.0
"""An idle connection older than this is closed rather than reused (servers commonly drop
idle clients after 60 s to 5 min; RFC 5321 asks them to wait at least 5 min)."""


class _StaleConnection(Exception):
    """An idle connection turned out to be closed before anything of the message was sent."""


def _reply_error(stage: str, code: int, text: str) -> ChannelError:
    reason = f"smtp {stage} refused: {code} {text}".strip()
    if 500 <= code < 600:
        return PermanentChannelError(reason)
    return TransientChannelError(reason)


def _is_hard_bounce(code: int, text: str) -> bool:
    """A refused recipient that does not exist: enhanced status 5.1.x (bad mailbox/address,
    RFC 3463) or, without an enhanced code, 550/551/553. Other 5xx (policy, storage, content)
    fail the message but say nothing about the address."""
    if not 500 <= code < 600:
        return False
    enhanced = _ENHANCED_STATUS.match(text.strip())
    if enhanced is not None:
        return enhanced[1] == "5" and enhanced[2] == "1"
    return code in (550, 551, 553)


def _single_address(value: str, *, what: str) -> tuple[str, str]:
    addresses = [(name, addr) for name, addr in getaddresses([value]) if name or addr]
    if len(addresses) != 1:
        raise PermanentChannelError(f"invalid {what} address: expected exactly one")
    name, addr = addresses[0]
    if not _ADDR_SPEC.match(addr):
        raise PermanentChannelError(f"invalid {what} address")
    if not addr.isascii():
        raise PermanentChannelError(f"unsupported non-ASCII {what} address")
    return name, addr


# The message is assembled with the compat32 API (email.mime), which takes header values as
# given: five times cheaper than EmailMessage, whose header registry parses every header it is
# handed (docs/benchmarks.md). What that parsing checked is checked here instead: addresses by
# `_single_address`, line breaks in header values by `_header`.
_WIRE_POLICY: Final = compat32.clone(linesep="\r\n", max_line_length=998)
"""Lines fold only beyond RFC 5322's hard limit: a long URL in List-Unsubscribe stays whole."""
_UTF8_QP: Final = email_charset.Charset("utf-8")
_UTF8_QP.body_encoding = email_charset.QP
_LINE_BREAK: Final = re.compile(r"[\r\n\x00]")


def _header(name: str, value: str) -> str | Header:
    """A header value: as it is when ASCII, RFC 2047-encoded otherwise; a line break would start
    a header of the recipient's choosing (injection) and is refused."""
    if _LINE_BREAK.search(value):
        raise PermanentChannelError(f"invalid message: {name} contains a line break")
    return value if value.isascii() else Header(value, "utf-8", header_name=name)


def _text_part(text: str, subtype: str) -> MIMEText:
    return MIMEText(text, subtype, _UTF8_QP)  # type: ignore[arg-type]  # a Charset works


def _smtp_data_payload(message: Message) -> bytes:
    raw = _LINE_ENDINGS.sub(b"\r\n", message.as_bytes(policy=_WIRE_POLICY))
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return _LEADING_DOT.sub(b"..", raw) + b".\r\n"


class SmtpChannel:
    name = "email"
    supports_idempotency = False

    def __init__(
        self,
        url: str,
        from_address: str,
        message_id_domain: str = "nudge.local",
        timeout_s: float = 10,
        *,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"unsupported SMTP url scheme {parts.scheme!r}")
        if not parts.hostname:
            raise ValueError("SMTP url has no host")
        use_tls, start_tls, default_port = _SCHEMES[parts.scheme]
        self._hostname = parts.hostname
        self._port = parts.port or default_port
        self._use_tls = use_tls
        self._start_tls = start_tls
        self._username = unquote(parts.username) if parts.username is not None else None
        self._password = unquote(parts.password) if parts.password is not None else None
        self._from_address = from_address
        self._envelope_sender = parseaddr(from_address)[1]
        if not _ADDR_SPEC.match(self._envelope_sender):
            raise ValueError(f"invalid from_address {from_address!r}")
        self._message_id_domain = message_id_domain
        self._timeout_s = timeout_s
        self._local_hostname = local_hostname
        self._tls_context = tls_context
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._closed = False

    def message_id(self, send_id: str) -> str:
        return f"<{send_id}@{self._message_id_domain}>"

    def build_message(self, msg: OutboundMessage) -> tuple[Message, str]:
        """The MIME message and the envelope recipient; PermanentChannelError if unusable."""
        to_field = msg.fields.get("to", "").strip()
        if not to_field:
            raise PermanentChannelError("missing address")
        display_name, recipient = _single_address(to_field, what="recipient")
        sender = msg.fields.get("from", "").strip()
        sender = formataddr(_single_address(sender, what="sender"), "utf-8") if sender else ""
        body = msg.fields.get("body", "")
        html = msg.fields.get("html", "")
        if not body and not html:
            raise PermanentChannelError("empty message: neither body nor html")
        message: Message
        if body and html:
            message = MIMEMultipart("alternative")
            message.attach(_text_part(body, "plain"))
            message.attach(_text_part(html, "html"))
        else:
            message = _text_part(body or html, "plain" if body else "html")
        headers: list[tuple[str, str | Header]] = [
            ("Message-ID", self.message_id(msg.send_id)),
            ("Date", format_datetime(datetime.now(UTC))),
            ("From", _header("From", sender or self._from_address)),
            ("To", formataddr((display_name, recipient), "utf-8")),
            ("Subject", _header("Subject", msg.fields.get("subject", ""))),
            ("X-Nudge-Send-Id", _header("X-Nudge-Send-Id", msg.send_id)),
        ]
        if msg.unsubscribe_url:
            # RFC 8058 one-click: the receiver POSTs `List-Unsubscribe=One-Click` to the URL.
            unsubscribe = _header("List-Unsubscribe", f"<{msg.unsubscribe_url}>")
            headers.append(("List-Unsubscribe", unsubscribe))
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        for name, value in headers:
            message[name] = value  # type: ignore[assignment]  # compat32 takes a Header too
        return message, recipient

    def _client(self) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=self._hostname,
            port=self._port,
            use_tls=self._use_tls,
            start_tls=self._start_tls,
            username=self._username,
            password=self._password,
            timeout=self._timeout_s,
            local_hostname=self._local_hostname,
            tls_context=self._tls_context,
        )

    async def send(self, msg: OutboundMessage) -> Delivery:
        message, recipient = self.build_message(msg)
        payload = _smtp_data_payload(message)
        smtp = self._take_idle()
        try:
            if smtp is not None:
                try:
                    await self._mail_from(smtp, reused=True)
                except _StaleConnection:
                    smtp.close()
                    smtp = None
            if smtp is None:
                smtp = self._client()
                await self._open(smtp)
                await self._mail_from(smtp, reused=False)
            await self._rcpt(smtp, recipient)
            reply = await self._transfer(smtp, payload)
        except BaseException:
            if smtp is not None:
                smtp.close()
            raise
        await self._release(smtp)
        return Delivery(provider_message_id=self.message_id(msg.send_id), detail=reply)

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        """The most recently used idle connection that is still open and not too old."""
        now = time.monotonic()
        while self._idle:
            smtp, since = self._idle.pop()
            if smtp.is_connected and now - since < IDLE_TIMEOUT_S:
                return smtp
            smtp.close()
        return None

    async def _release(self, smtp: aiosmtplib.SMTP) -> None:
        """Keep a connection whose message was accepted for the next one, or QUIT it."""
        if self._closed or len(self._idle) >= MAX_IDLE_CONNECTIONS or not smtp.is_connected:
            await self._quit(smtp)
            return
        self._idle.append((smtp, time.monotonic()))

    async def _open(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.connect()
        except aiosmtplib.SMTPResponseException as error:
            raise _reply_error("session", error.code, error.message) from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise TransientChannelError(f"smtp connect failed: {error}") from error

    async def _mail_from(self, smtp: aiosmtplib.SMTP, *, reused: bool) -> None:
        """MAIL FROM; on a `reused` connection a lost transport or a 421 (the server is closing
        the idle session) raises _StaleConnection: nothing of the message was sent yet."""
        try:
            await smtp.mail(self._envelope_sender)
        except aiosmtplib.SMTPResponseException as error:
            if reused and error.code == _CLOSING:
                raise _StaleConnection from error
            raise _reply_error("sender", error.code, error.message) from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            if reused:
                raise _StaleConnection from error
            raise TransientChannelError(f"smtp envelope failed: {error}") from error

    async def _rcpt(self, smtp: aiosmtplib.SMTP, recipient: str) -> None:
        try:
            await smtp.rcpt(recipient)
        except aiosmtplib.SMTPRecipientRefused as error:
            if _is_hard_bounce(error.code, error.message):
                raise UndeliverableAddressError(
                    f"smtp recipient refused: {error.code} {error.message}".strip(),
                    address=recipient,
                ) from error
            raise _reply_error("recipient", error.code, error.message) from error
        except aiosmtplib.SMTPResponseException as error:
            raise _reply_error("envelope", error.code, error.message) from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise TransientChannelError(f"smtp envelope failed: {error}") from error

    async def _transfer(self, smtp: aiosmtplib.SMTP, payload: bytes) -> str:
        # aiosmtplib's data() sends DATA and the content in one call, so a lost connection
        # cannot be placed before or after the content. Until the server's 354 nothing of the
        # message exists there (transient); once the content is written only the final reply
        # tells, and without it the outcome is ambiguous.
        try:
            start = await smtp.execute_command(b"DATA")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise TransientChannelError(f"smtp DATA failed: {error}") from error
        if start.code != _DATA_START:
            raise _reply_error("DATA", start.code, start.message)
        protocol = smtp.protocol
        if protocol is None:
            raise TransientChannelError("smtp connection lost before content")
        try:
            protocol.write(payload)
        except (aiosmtplib.SMTPException, OSError) as error:
            raise TransientChannelError(f"smtp connection lost before content: {error}") from error
        try:
            reply = await protocol.read_response(timeout=self._timeout_s)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise AmbiguousChannelError(
                f"smtp no reply after message content: {error}",
                retryable=self.supports_idempotency,
            ) from error
        if reply.code not in (_COMPLETED, _WILL_FORWARD):
            raise _reply_error("message", reply.code, reply.message)
        return f"{reply.code} {reply.message}"

    async def _quit(self, smtp: aiosmtplib.SMTP) -> None:
        # The message is already accepted; a failing QUIT changes nothing about the send.
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()

    async def aclose(self) -> None:
        """QUIT the idle connections; connections in use are QUIT when their send ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for smtp, _ in idle:
            await self._quit(smtp)
