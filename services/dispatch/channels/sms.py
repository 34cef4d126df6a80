"""SMS through a Twilio-style REST API.

`POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded `To`, `From` and/or
`MessagingServiceSid`, `Body`, optional `StatusCallback`; HTTP Basic auth `AccountSid:AuthToken`.
Message fields: `to` (E.164 phone number), `body`.

Twilio has no idempotency key: a request whose answer is lost may have been sent
(`supports_idempotency` False; the dispatcher's ambiguous policy applies).
"""

from __future__ import annotations

import base64
import re
import ssl
from typing import Final
from urllib.parse import quote, urlencode

import httpx

from services.dispatch.channels import provider_http
from services.dispatch.channels.base import (
    Delivery,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
    UndeliverableAddressError,
)

TWILIO: Final = "twilio"
E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
# Visual separators people type into phone numbers; anything else makes the number invalid.
_SEPARATORS: Final = re.compile(r"[\s().-]")
_ACCOUNT_SID: Final = re.compile(r"[A-Za-z0-9]{1,64}")
_USER_AGENT: Final = "nudge-sms/0.1"
# https://www.twilio.com/docs/api/errors
OPTED_OUT_CODES: Final = frozenset({21610})  # the recipient replied STOP
TRANSIENT_CODES: Final = frozenset({21611, 20429})  # From's queue full; too many requests


class RecipientOptedOutError(UndeliverableAddressError):
    """The provider refuses because the recipient unsubscribed at the carrier level (STOP).

    Permanent for this send, and (as an UndeliverableAddressError) a signal: dispatch records
    `address` so no later SMS goes to it until the user opts in again (`sms_subscribe:
    opted_in`). `address` is the rendered `to` field as dispatch compares it (stripped),
    `number` its E.164 form, `code` the provider's error code.
    """

    def __init__(self, reason: str, *, address: str, number: str, provider: str, code: int) -> None:
        super().__init__(reason, address=address)
        self.number = number
        self.provider = provider
        self.code = code


def normalize_phone_number(raw: str) -> str:
    """The E.164 form of `raw` (`+1 (415) 555-0100` → `+14155550100`), or
    PermanentChannelError."""
    text = raw.strip()
    if not text:
        raise PermanentChannelError("missing address: no phone number")
    number = _SEPARATORS.sub("", text)
    if not E164.fullmatch(number):
        raise PermanentChannelError("invalid phone number: expected E.164 (+ and 2-15 digits)")
    return number


class TwilioChannel:
    """One REST call per message; 201 returns the provider's message SID."""

    name = "sms"
    supports_idempotency = False

    def __init__(
        self,
        base_url: str,
        account_sid: str,
        auth_token: str,
        *,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback_url: str | None = None,
        timeout_s: float = 10,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if not _ACCOUNT_SID.fullmatch(account_sid):
            raise ValueError("invalid Twilio account SID")
        if not auth_token:
            raise ValueError("Twilio auth token is empty")
        if not from_number and not messaging_service_sid:
            raise ValueError("Twilio needs a From number or a messaging service SID")
        self.url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{quote(account_sid)}/Messages.json"
        self._sender: dict[str, str] = {}
        if from_number:
            self._sender["From"] = from_number
        if messaging_service_sid:
            self._sender["MessagingServiceSid"] = messaging_service_sid
        self._status_callback_url = status_callback_url
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode("ascii")
        self._authorization = f"Basic {credentials}"
        self._client = provider_http.new_client(
            timeout_s=timeout_s, http2=False, tls_context=tls_context
        )

    def form(self, msg: OutboundMessage) -> dict[str, str]:
        """The form parameters of the request (PermanentChannelError if unusable)."""
        to = normalize_phone_number(msg.fields.get("to", ""))
        body = msg.fields.get("body", "")
        if not body.strip():
            raise PermanentChannelError("empty message: no body")
        form = {"To": to, **self._sender, "Body": body}
        if self._status_callback_url:
            form["StatusCallback"] = self._status_callback_url
        return form

    async def send(self, msg: OutboundMessage) -> Delivery:
        form = self.form(msg)
        response = await provider_http.post(
            self._client,
            self.url,
            provider=TWILIO,
            idempotent=self.supports_idempotency,
            headers={
                "authorization": self._authorization,
                "content-type": "application/x-www-form-urlencoded",
                "accept": "application/json",
                "user-agent": _USER_AGENT,
            },
            content=urlencode(form).encode("ascii"),
        )
        return _outcome(response, msg.fields.get("to", "").strip(), form["To"])

    async def aclose(self) -> None:
        await self._client.aclose()


def _outcome(response: httpx.Response, address: str, number: str) -> Delivery:
    status = response.status_code
    body = provider_http.json_body(response)
    if 200 <= status < 300:
        sid = body.get("sid")
        state = body.get("status") or "accepted"
        return Delivery(provider_message_id=str(sid) if sid else None, detail=f"twilio {state}")
    code = body.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    message = str(body.get("message") or "")[:200] or provider_http.detail(response)
    summary = f"twilio {status}" + (f" {code}" if code is not None else "") + f": {message}"
    if code in OPTED_OUT_CODES:
        raise RecipientOptedOutError(
            f"recipient unsubscribed ({summary})",
            address=address,
            number=number,
            provider=TWILIO,
            code=code or 0,
        )
    if code in TRANSIENT_CODES:
        raise TransientChannelError(summary, retry_after_s=provider_http.retry_after_s(response))
    if status in (401, 403):
        # Our credentials, not the message: keep the send and retry once they are fixed.
        raise TransientChannelError(f"twilio rejected our credentials ({summary})")
    raise provider_http.status_error(response, summary)
