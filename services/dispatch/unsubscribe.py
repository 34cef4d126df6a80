"""One-click unsubscribe links (RFC 8058): signed tokens naming who unsubscribes from what.

A token is `v1.<payload>.<mac>`: the payload is base64url JSON `{w, u, c, s}` (workspace, user,
channel, send id), the MAC HMAC-SHA256 over `v1.<payload>` with the dispatch unsubscribe secret.
Tokens do not expire: an unsubscribe link in a two-year-old email must still work. A token only
ever lets its holder unsubscribe that user from that channel, which is also what the link in
the mail says it does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlencode

MAX_TOKEN_CHARS: Final = 2048
_VERSION: Final = "v1"
_CHANNELS: Final = frozenset({"email", "push", "sms"})


class InvalidTokenError(ValueError):
    """The token is malformed or its signature does not verify."""


@dataclass(frozen=True)
class UnsubscribeRequest:
    """Who unsubscribes from which channel, and the send whose link was used."""

    workspace_id: str
    user_id: str
    channel: str
    send_id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as error:
        raise InvalidTokenError("not base64url") from error


def derive_secret(material: str) -> bytes:
    """A key for unsubscribe tokens derived from other secret material (the webhook secret),
    domain-separated so the two keys are independent in use."""
    return hmac.new(
        material.encode("utf-8"), b"nudge unsubscribe token v1", hashlib.sha256
    ).digest()


class UnsubscribeLinks:
    """Makes and verifies unsubscribe URLs for one secret and one public base URL."""

    def __init__(self, secret: bytes, base_url: str) -> None:
        if len(secret) < 16:
            raise ValueError("unsubscribe secret must be at least 16 bytes")
        self._secret = secret
        self._base_url = base_url

    def _mac(self, signed: str) -> str:
        return _b64(hmac.new(self._secret, signed.encode("ascii"), hashlib.sha256).digest())

    def token(self, request: UnsubscribeRequest) -> str:
        """The signed token for `request`."""
        payload = json.dumps(
            {
                "w": request.workspace_id,
                "u": request.user_id,
                "c": request.channel,
                "s": request.send_id,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )
        signed = f"{_VERSION}.{_b64(payload.encode('utf-8'))}"
        return f"{signed}.{self._mac(signed)}"

    def url(self, request: UnsubscribeRequest) -> str:
        """The link for the `List-Unsubscribe` header."""
        separator = "&" if "?" in self._base_url else "?"
        return f"{self._base_url}{separator}{urlencode({'token': self.token(request)})}"

    def verify(self, token: str) -> UnsubscribeRequest:
        """The request a token stands for; InvalidTokenError unless it is ours and intact."""
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidTokenError("token too long")
        version, _, rest = token.partition(".")
        payload, _, mac = rest.partition(".")
        if version != _VERSION or not payload or not mac:
            raise InvalidTokenError("malformed token")
        if not hmac.compare_digest(self._mac(f"{version}.{payload}"), mac):
            raise InvalidTokenError("bad signature")
        try:
            data = json.loads(_unb64(payload))
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidTokenError("bad payload") from error
        if not isinstance(data, dict):
            raise InvalidTokenError("bad payload")
        fields = [data.get(key) for key in ("w", "u", "c", "s")]
        if not all(isinstance(value, str) and value for value in fields):
            raise InvalidTokenError("incomplete payload")
        workspace_id, user_id, channel, send_id = (str(value) for value in fields)
        if channel not in _CHANNELS:
            raise InvalidTokenError("unknown channel")
        return UnsubscribeRequest(workspace_id, user_id, channel, send_id)
