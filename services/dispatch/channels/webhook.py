"""Signed JSON webhooks (Standard Webhooks) with an SSRF guard."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import socket
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from services.dispatch.channels.base import (
    AmbiguousChannelError,
    Delivery,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_RETRYABLE_STATUS: Final = frozenset({408, 429})
_NAT64_PREFIX: Final = ipaddress.IPv6Network("64:ff9b::/96")
_RESPONSE_DETAIL_BYTES: Final = 256
_USER_AGENT: Final = "nudge-webhook/0.1"
_KEY_PREFIX: Final = "whsec_"


def _decode_secret(secret: str) -> bytes:
    # standardwebhooks decodes non-strictly: a mistyped secret silently becomes another key.
    if not secret.startswith(_KEY_PREFIX):
        raise ValueError("webhook secret must start with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(_KEY_PREFIX) :], validate=True)
    except binascii.Error as error:
        raise ValueError("webhook secret is not valid base64") from error
    if len(key) < 16:
        raise ValueError("webhook secret must decode to at least 16 bytes")
    return key


def is_public_address(address: IPAddress) -> bool:
    """Globally routable unicast, including addresses embedded in IPv6 transition forms."""
    if address.is_multicast or not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if address in _NAT64_PREFIX:
            embedded.append(ipaddress.IPv4Address(address.packed[-4:]))
        return all(is_public_address(inner) for inner in embedded)
    return True


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from `Retry-After` (delta-seconds or HTTP-date), never negative."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if 0 <= seconds < float("inf") else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class Destination:
    """A vetted target: one URL per checked address, the Host header and the TLS name."""

    urls: tuple[httpx.URL, ...]
    host_header: str
    sni_hostname: str | None


def workspace_secret(master_secret: str, workspace_id: str) -> str:
    """The Standard Webhooks secret (`whsec_…`) a workspace's receivers verify with.

    Derived from the master secret (`NUDGE_WEBHOOK_SECRET`) by HMAC-SHA256 over the workspace
    id, so every workspace has its own key, none is stored, and rotating the master rotates all.
    `nudge webhooks secret --workspace W` prints it for a receiver's configuration."""
    key = hmac.new(
        _decode_secret(master_secret), b"nudge-webhook:" + workspace_id.encode(), "sha256"
    )
    return _KEY_PREFIX + base64.b64encode(key.digest()).decode()


class WebhookChannel:
    name = "webhook"
    supports_idempotency = True

    def __init__(
        self,
        secret: str,
        timeout_s: float = 10,
        allow_private_hosts: Collection[str] = (),
        *,
        total_timeout_s: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # httpx timeouts are per read/write; a receiver dripping bytes would never trip them.
        self._total_timeout_s = total_timeout_s if total_timeout_s is not None else 3 * timeout_s
        _decode_secret(secret)
        self._master_secret = secret
        self._signers: dict[str, Webhook] = {}
        self._allow_private_hosts = frozenset(host.lower() for host in allow_private_hosts)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            # Environment proxies would bypass the address pinning below.
            trust_env=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _is_allowed_private(self, host: str, port: int) -> bool:
        bare = host.strip("[]").lower()
        return bool({bare, f"{bare}:{port}", f"[{bare}]:{port}"} & self._allow_private_hosts)

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            raise TransientChannelError(f"cannot resolve webhook host {host!r}: {error}") from error
        addresses: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise TransientChannelError(f"webhook host {host!r} has no addresses")
        return addresses

    async def vet_destination(self, raw_url: str) -> Destination:
        """Resolve once, refuse non-public targets, and pin connections to those addresses."""
        try:
            parts = urlsplit(raw_url.strip())
            port = parts.port
        except ValueError as error:
            raise PermanentChannelError(f"blocked destination: invalid url ({error})") from error
        if parts.scheme not in _DEFAULT_PORTS:
            raise PermanentChannelError(f"blocked destination: scheme {parts.scheme!r}")
        host = parts.hostname
        if not host:
            raise PermanentChannelError("blocked destination: url has no host")
        port = port or _DEFAULT_PORTS[parts.scheme]
        addresses = await self._resolve(host, port)
        if not self._is_allowed_private(host, port):
            refused = [address for address in addresses if not is_public_address(address)]
            if refused:
                raise PermanentChannelError(
                    f"blocked destination {host}:{port} resolves to non-public {refused[0]}"
                )
        # Connect to the addresses we checked, so a second DNS answer cannot swap them
        # (DNS rebinding); the Host header and TLS server name keep the original host.
        try:
            url = httpx.URL(raw_url.strip())
            urls = tuple(url.copy_with(host=str(address)) for address in addresses)
        except (httpx.InvalidURL, ValueError) as error:
            raise PermanentChannelError(f"blocked destination: invalid url ({error})") from error
        netloc_host = f"[{host}]" if ":" in host else host
        default_port = parts.port is None or parts.port == _DEFAULT_PORTS[parts.scheme]
        host_header = netloc_host if default_port else f"{netloc_host}:{port}"
        sni_hostname = host if parts.scheme == "https" and not _is_ip_literal(host) else None
        return Destination(urls, host_header, sni_hostname)

    def body(self, msg: OutboundMessage) -> str:
        payload = msg.fields.get("payload")
        if payload is None:
            message = {key: value for key, value in msg.fields.items() if key != "url"}
            return json.dumps(
                {"send_id": msg.send_id, "user_id": msg.user_id, "message": message},
                ensure_ascii=False,
                separators=(",", ":"),
            )
        try:
            json.loads(payload)
        except ValueError as error:
            raise PermanentChannelError(f"payload is not valid JSON: {error}") from error
        return payload

    def _signer(self, workspace_id: str) -> Webhook:
        signer = self._signers.get(workspace_id)
        if signer is None:
            secret = workspace_secret(self._master_secret, workspace_id)
            signer = self._signers[workspace_id] = Webhook(_decode_secret(secret))
        return signer

    def signed_headers(
        self, workspace_id: str, send_id: str, body: str, now: datetime
    ) -> dict[str, str]:
        # sign() relabels the datetime as UTC instead of converting it: pass an aware UTC now.
        timestamp = now.astimezone(UTC)
        return {
            "webhook-id": send_id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": self._signer(workspace_id).sign(send_id, timestamp, body),
            "idempotency-key": send_id,
        }

    async def send(self, msg: OutboundMessage) -> Delivery:
        url = msg.fields.get("url", "").strip()
        if not url:
            raise PermanentChannelError("missing address: no webhook url")
        body = self.body(msg)
        destination = await self.vet_destination(url)
        headers = {
            "host": destination.host_header,
            "content-type": "application/json",
            "user-agent": _USER_AGENT,
            # Only a prefix of the response body is read; keep it uncompressed.
            "accept-encoding": "identity",
            **self.signed_headers(msg.workspace_id, msg.send_id, body, datetime.now(UTC)),
        }
        if msg.traceparent:
            headers["traceparent"] = msg.traceparent
        response: httpx.Response | None = None
        detail = ""
        try:
            async with asyncio.timeout(self._total_timeout_s):
                response = await self._exchange(destination, body.encode("utf-8"), headers)
                detail = await _read_prefix(response)
        except TimeoutError as error:
            # Only the overall deadline surfaces as TimeoutError (httpx raises its own types).
            # Without a status line the request may or may not have been acted upon.
            if response is None:
                raise AmbiguousChannelError(
                    f"webhook exceeded {self._total_timeout_s:g}s total",
                    retryable=self.supports_idempotency,
                ) from error
        finally:
            if response is not None:
                await response.aclose()
        return _outcome(response, detail)

    async def _exchange(
        self, destination: Destination, content: bytes, headers: dict[str, str]
    ) -> httpx.Response:
        """POST to the first vetted address that accepts a connection; errors classified."""
        extensions = {"sni_hostname": destination.sni_hostname} if destination.sni_hostname else {}
        connect_errors: list[httpx.HTTPError] = []
        for url in destination.urls:
            request = self._client.build_request(
                "POST", url, content=content, headers=headers, extensions=extensions
            )
            try:
                return await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                connect_errors.append(error)
            except httpx.PoolTimeout as error:
                raise TransientChannelError(f"webhook connect failed: {error!r}") from error
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as error:
                raise PermanentChannelError(f"webhook request invalid: {error!r}") from error
            except httpx.TransportError as error:
                # Written (at least in part) but unanswered: the receiver may have acted on
                # it. Retrying is safe only because it dedupes on webhook-id/Idempotency-Key.
                raise AmbiguousChannelError(
                    f"webhook sent but no response: {error!r}",
                    retryable=self.supports_idempotency,
                ) from error
        raise TransientChannelError(f"webhook connect failed: {connect_errors[-1]!r}")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _read_prefix(response: httpx.Response) -> str:
    collected = b""
    try:
        async for chunk in response.aiter_raw():
            collected += chunk
            if len(collected) >= _RESPONSE_DETAIL_BYTES:
                break
    except httpx.HTTPError:
        # The status line is what counts; a broken response body does not change it.
        pass
    return collected[:_RESPONSE_DETAIL_BYTES].decode("utf-8", "replace")


def _outcome(response: httpx.Response, detail: str) -> Delivery:
    status = response.status_code
    summary = f"http {status}: {detail}".strip().rstrip(":")
    if 200 <= status < 300:
        return Delivery(provider_message_id=None, detail=summary)
    if status in _RETRYABLE_STATUS or status >= 500:
        raise TransientChannelError(
            summary, retry_after_s=parse_retry_after(response.headers.get("retry-after"))
        )
    if 300 <= status < 400:
        raise PermanentChannelError(f"http {status}: redirects are not followed")
    raise PermanentChannelError(summary)
