"""Mobile push: FCM HTTP v1 and APNs (HTTP/2, ES256 provider tokens) behind the channel `push`.

Message fields: `to` (the device token), `subject` (title), `body`, `payload` (a JSON object of
custom data), optional `platform`. Which provider gets a message (`route_push`):
1. the `platform` field, if present: `ios`/`apns` → APNs, `android`/`web`/`fcm` → FCM;
2. else a `<platform>:` prefix on `to` (`to: "{{ user.traits.push_platform }}:{{ ... }}"`),
   which is stripped from the token in any case;
3. else the token itself: an all-hex token of 64+ characters is an APNs device token, anything
   else (FCM registration tokens contain `:`) goes to FCM.

A provider's "this token is dead" answer (APNs 410, FCM 404 UNREGISTERED) raises
`UnregisteredTokenError`, so the dispatcher can record that the token must not be used again.
"""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.dispatch.channels import provider_http
from services.dispatch.channels.base import (
    Delivery,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
    UndeliverableAddressError,
)
from services.dispatch.channels.provider_http import AccessTokenProvider

APNS: Final = "apns"
FCM: Final = "fcm"
PLATFORMS: Final = {"ios": APNS, "apns": APNS, "android": FCM, "web": FCM, "fcm": FCM}
# APNs device tokens are hex (32 bytes today; Apple reserves the right to make them longer).
_APNS_TOKEN: Final = re.compile(r"(?:[0-9a-fA-F]{2}){32,256}")
_FCM_TOKEN_MAX_CHARS: Final = 4096
_FCM_PROJECT_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
_APNS_TOPIC: Final = re.compile(r"[A-Za-z0-9._-]{1,255}")
_APNS_PUSH_TYPES: Final = frozenset({"alert", "background"})
_APNS_PRIORITIES: Final = frozenset({1, 5, 10})
_USER_AGENT: Final = "nudge-push/0.1"


class UnregisteredTokenError(UndeliverableAddressError):
    """The provider says the device token is no longer valid (app uninstalled, token rotated).

    Permanent for this send, and (as an UndeliverableAddressError) a signal: dispatch records
    `address` so no later push goes to it. `address` is the rendered `to` field as dispatch
    compares it (stripped; it may carry a `platform:` prefix), `token` the bare device token,
    `unregistered_at` when the provider last knew the token to be invalid (APNs `timestamp`).
    """

    def __init__(
        self,
        reason: str,
        *,
        address: str,
        provider: str,
        token: str,
        unregistered_at: datetime | None = None,
    ) -> None:
        super().__init__(reason, address=address)
        self.provider = provider
        self.token = token
        self.unregistered_at = unregistered_at


@dataclass(frozen=True)
class PushRoute:
    """Which provider a push goes to, and the bare device token."""

    provider: str
    token: str


def route_push(fields: Mapping[str, str]) -> PushRoute:
    """Pick the provider for a rendered push message (rules in the module docstring)."""
    token = fields.get("to", "").strip()
    platform = fields.get("platform", "").strip().lower()
    head, sep, rest = token.partition(":")
    if sep and head.strip().lower() in PLATFORMS:
        platform, token = platform or head.strip().lower(), rest.strip()
    if not token:
        raise PermanentChannelError("missing address: no push token")
    if platform:
        provider = PLATFORMS.get(platform)
        if provider is None:
            raise PermanentChannelError(f"unknown push platform {platform[:32]!r}")
    else:
        provider = APNS if _APNS_TOKEN.fullmatch(token) else FCM
    return PushRoute(provider, token)


def _alert(msg: OutboundMessage) -> dict[str, str]:
    alert = {
        key: value
        for key, value in (
            ("title", msg.fields.get("subject", "")),
            ("body", msg.fields.get("body", "")),
        )
        if value
    }
    if not alert:
        raise PermanentChannelError("empty push message: neither subject nor body")
    return alert


def _custom_data(msg: OutboundMessage) -> dict[str, Any]:
    raw = msg.fields.get("payload", "")
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise PermanentChannelError(f"payload is not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise PermanentChannelError("payload must be a JSON object")
    return document


def _json_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------------------------
# FCM HTTP v1
# --------------------------------------------------------------------------------------------


def _fcm_error_code(error: dict[str, Any]) -> str:
    """The FcmError `errorCode` from google.rpc-style details, else the rpc `status`."""
    for item in error.get("details") or ():
        if (
            isinstance(item, dict)
            and str(item.get("@type", "")).endswith("FcmError")
            and item.get("errorCode")
        ):
            return str(item["errorCode"])
    return str(error.get("status") or "")


class FcmChannel:
    """`POST {base}/v1/projects/{project}/messages:send`, OAuth2 bearer token.

    FCM v1 has no idempotency key: a retry after a lost answer may deliver twice.
    """

    name = "push"
    provider = FCM
    supports_idempotency = False

    def __init__(
        self,
        base_url: str,
        project_id: str,
        access_token: AccessTokenProvider,
        *,
        timeout_s: float = 10,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if not _FCM_PROJECT_ID.fullmatch(project_id):
            raise ValueError(f"invalid FCM project id {project_id!r}")
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self._tokens = access_token
        self._client = provider_http.new_client(
            timeout_s=timeout_s, http2=True, tls_context=tls_context
        )

    def body(self, token: str, msg: OutboundMessage) -> bytes:
        """The `messages:send` request body (data values must be strings)."""
        message: dict[str, Any] = {"token": token, "notification": _alert(msg)}
        data = {
            str(key): value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            for key, value in _custom_data(msg).items()
        }
        if data:
            message["data"] = data
        return _json_bytes({"message": message})

    async def send(self, msg: OutboundMessage) -> Delivery:
        return await self.send_to_token(msg.fields.get("to", "").strip(), msg)

    async def send_to_token(self, token: str, msg: OutboundMessage) -> Delivery:
        """Send `msg` to the registration token `token`."""
        if not token:
            raise PermanentChannelError("missing address: no push token")
        if len(token) > _FCM_TOKEN_MAX_CHARS:
            raise PermanentChannelError("invalid registration token for fcm: too long")
        content = self.body(token, msg)
        credential = await self._tokens.token()
        response = await self._post(credential, content)
        if _fcm_auth_rejected(response) and await self._tokens.refresh(credential):
            response = await self._post(await self._tokens.token(), content)
        return _fcm_outcome(response, token, msg)

    async def _post(self, credential: str, content: bytes) -> httpx.Response:
        headers = {
            "authorization": f"Bearer {credential}",
            "content-type": "application/json; charset=utf-8",
            "user-agent": _USER_AGENT,
        }
        return await provider_http.post(
            self._client,
            self.url,
            provider=FCM,
            idempotent=self.supports_idempotency,
            headers=headers,
            content=content,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _fcm_auth_rejected(response: httpx.Response) -> bool:
    if response.status_code == 401:
        return True
    if response.status_code != 403:
        return False
    error = provider_http.json_body(response).get("error")
    code = _fcm_error_code(error) if isinstance(error, dict) else ""
    return code != "SENDER_ID_MISMATCH"


def _fcm_outcome(response: httpx.Response, token: str, msg: OutboundMessage) -> Delivery:
    status = response.status_code
    body = provider_http.json_body(response)
    if 200 <= status < 300:
        name = body.get("name")
        return Delivery(provider_message_id=str(name) if name else None, detail=f"fcm {status}")
    error = body.get("error")
    if not isinstance(error, dict):
        error = {}
    code = _fcm_error_code(error)
    message = str(error.get("message") or "")[:200] or provider_http.detail(response)
    summary = f"fcm {status} {code}: {message}".strip().rstrip(":")
    if code == "UNREGISTERED" and status in (400, 404):
        raise UnregisteredTokenError(
            f"unregistered token ({summary})",
            address=msg.fields.get("to", "").strip(),
            provider=FCM,
            token=token,
        )
    if _fcm_auth_rejected(response):
        # Our credential, not the message: keep the send and retry once it is fixed.
        raise TransientChannelError(f"fcm rejected our access token ({summary})")
    raise provider_http.status_error(response, summary)


# --------------------------------------------------------------------------------------------
# APNs (HTTP/2, token-based authentication)
# --------------------------------------------------------------------------------------------


class ApnsJwtSigner:
    """ES256 provider tokens (`kid` = key id, `iss` = team id, `iat`), reused for `lifetime_s`.

    APNs refuses tokens older than an hour and answers 429 TooManyProviderTokenUpdates to a
    sender that mints new ones more often than every 20 minutes, so a rejected token is
    replaced only if it is at least `min_refresh_s` old.
    """

    def __init__(
        self,
        team_id: str,
        key_id: str,
        private_key_pem: str | bytes,
        *,
        lifetime_s: float = 50 * 60,
        min_refresh_s: float = 20 * 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not team_id or not key_id:
            raise ValueError("APNs team id and key id are required")
        pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("APNs signing key must be an EC P-256 private key (.p8)")
        self._key = key
        self._team_id = team_id
        self._key_id = key_id
        self._lifetime_s = lifetime_s
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._current: str | None = None
        self._issued_at = 0.0

    def _mint(self) -> str:
        now = self._clock()
        self._current = jwt.encode(
            {"iss": self._team_id, "iat": int(now)},
            self._key,
            algorithm="ES256",
            headers={"kid": self._key_id},
        )
        self._issued_at = now
        return self._current

    async def token(self) -> str:
        if self._current is None or self._clock() - self._issued_at >= self._lifetime_s:
            return self._mint()
        return self._current

    async def refresh(self, rejected: str) -> bool:
        if rejected != self._current:
            return True  # already replaced by a concurrent send
        if self._clock() - self._issued_at < self._min_refresh_s:
            return False
        self._mint()
        return True


class ApnsChannel:
    """`POST {base}/3/device/<token>` over HTTP/2 with a bearer provider token.

    Idempotency: `apns-id` and `apns-collapse-id` are the send id. APNs documents that
    notifications sharing a collapse id are shown to the user as one, so a retry after a lost
    answer replaces the first notification instead of adding a second.
    """

    name = "push"
    provider = APNS
    supports_idempotency = True

    def __init__(
        self,
        base_url: str,
        topic: str,
        signer: AccessTokenProvider,
        *,
        push_type: str = "alert",
        priority: int = 10,
        timeout_s: float = 10,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if not _APNS_TOPIC.fullmatch(topic):
            raise ValueError(f"invalid APNs topic {topic!r}")
        if push_type not in _APNS_PUSH_TYPES:
            raise ValueError(f"unsupported apns-push-type {push_type!r}")
        if priority not in _APNS_PRIORITIES:
            raise ValueError(f"apns-priority must be 1, 5 or 10, got {priority}")
        self._base = base_url.rstrip("/")
        self._topic = topic
        self._signer = signer
        self._push_type = push_type
        self._priority = priority
        # APNs speaks HTTP/2 only.
        self._client = provider_http.new_client(
            timeout_s=timeout_s, http2=True, tls_context=tls_context
        )

    def body(self, msg: OutboundMessage) -> bytes:
        """`{"aps": {"alert": {...}, ...}, ...custom}`; an `aps` object in the payload is
        merged into ours (badge, sound, category…)."""
        custom = _custom_data(msg)
        extra = custom.pop("aps", {})
        if not isinstance(extra, dict):
            raise PermanentChannelError("payload 'aps' must be a JSON object")
        return _json_bytes({"aps": {**extra, "alert": _alert(msg)}, **custom})

    def headers(self, msg: OutboundMessage, credential: str) -> dict[str, str]:
        """The request headers for one attempt."""
        return {
            "authorization": f"bearer {credential}",
            "apns-topic": self._topic,
            "apns-push-type": self._push_type,
            "apns-priority": str(self._priority),
            "apns-id": msg.send_id,
            "apns-collapse-id": msg.send_id,
            "content-type": "application/json",
            "user-agent": _USER_AGENT,
        }

    async def send(self, msg: OutboundMessage) -> Delivery:
        return await self.send_to_token(msg.fields.get("to", "").strip(), msg)

    async def send_to_token(self, token: str, msg: OutboundMessage) -> Delivery:
        """Send `msg` to the device token `token` (validated: it becomes part of the path)."""
        if not token:
            raise PermanentChannelError("missing address: no push token")
        if not _APNS_TOKEN.fullmatch(token):
            raise PermanentChannelError("invalid device token for apns: expected hex")
        content = self.body(msg)
        url = f"{self._base}/3/device/{token.lower()}"
        credential = await self._signer.token()
        response = await self._post(url, msg, credential, content)
        if response.status_code == 403 and await self._signer.refresh(credential):
            response = await self._post(url, msg, await self._signer.token(), content)
        return _apns_outcome(response, token, msg)

    async def _post(
        self, url: str, msg: OutboundMessage, credential: str, content: bytes
    ) -> httpx.Response:
        return await provider_http.post(
            self._client,
            url,
            provider=APNS,
            idempotent=self.supports_idempotency,
            headers=self.headers(msg, credential),
            content=content,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _apns_timestamp(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _apns_outcome(response: httpx.Response, token: str, msg: OutboundMessage) -> Delivery:
    status = response.status_code
    if status == 200:
        apns_id = response.headers.get("apns-id") or msg.send_id
        return Delivery(provider_message_id=apns_id, detail="apns 200")
    body = provider_http.json_body(response)
    reason = str(body.get("reason") or "") or provider_http.detail(response)
    summary = f"apns {status} {reason}".strip()
    if status == 410:
        raise UnregisteredTokenError(
            f"unregistered token ({summary})",
            address=msg.fields.get("to", "").strip(),
            provider=APNS,
            token=token,
            unregistered_at=_apns_timestamp(body.get("timestamp")),
        )
    if status == 403:
        # Our provider token or key, not the message (a fresh token was already tried).
        raise TransientChannelError(f"apns rejected our provider token ({summary})")
    raise provider_http.status_error(response, summary)


# --------------------------------------------------------------------------------------------
# The `push` channel
# --------------------------------------------------------------------------------------------


class PushChannel:
    """Routes each push to FCM or APNs (see `route_push`).

    `supports_idempotency` is True only when every configured provider dedupes: after a crash
    the dispatcher cannot tell which provider an interrupted attempt went to.
    """

    name = "push"

    def __init__(self, *, fcm: FcmChannel | None = None, apns: ApnsChannel | None = None) -> None:
        self._providers: dict[str, FcmChannel | ApnsChannel] = {}
        if fcm is not None:
            self._providers[FCM] = fcm
        if apns is not None:
            self._providers[APNS] = apns
        if not self._providers:
            raise ValueError("a push channel needs FCM, APNs or both")
        self.supports_idempotency = all(p.supports_idempotency for p in self._providers.values())

    @property
    def providers(self) -> tuple[str, ...]:
        """The configured providers (`fcm`, `apns`)."""
        return tuple(self._providers)

    async def send(self, msg: OutboundMessage) -> Delivery:
        route = route_push(msg.fields)
        provider = self._providers.get(route.provider)
        if provider is None:
            raise PermanentChannelError(f"push provider {route.provider} is not configured")
        return await provider.send_to_token(route.token, msg)

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
