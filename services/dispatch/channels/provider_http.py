"""What the provider channels (push, SMS) share: one HTTP exchange, its failures classified.

Provider endpoints are configuration, not user input, so there is no SSRF guard here (that is
the webhook channel's job); user data reaches a provider only inside the request body or as a
validated path segment.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from typing import Any, Final, Protocol

import httpx

from services.dispatch.channels.base import (
    AmbiguousChannelError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)
from services.dispatch.channels.webhook import parse_retry_after

# Statuses that say "not now" rather than "never": timeouts, rate limits, server trouble.
TRANSIENT_STATUS: Final = frozenset({408, 425, 429})
_DETAIL_CHARS: Final = 200


class AccessTokenProvider(Protocol):
    """Hands out the bearer credential for a provider and replaces it when it is rejected."""

    async def token(self) -> str:
        """The credential to send now (cached by the provider)."""
        ...

    async def refresh(self, rejected: str) -> bool:
        """The provider refused `rejected`: get another. True when a different credential is
        now available (retrying with the same one would be refused again)."""
        ...


class StaticAccessToken:
    """A fixed bearer token from configuration; it cannot be refreshed."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("access token is empty")
        self._token = token

    async def token(self) -> str:
        return self._token

    async def refresh(self, rejected: str) -> bool:
        return False


def new_client(
    *, timeout_s: float, http2: bool, tls_context: ssl.SSLContext | None
) -> httpx.AsyncClient:
    """A pooled client that talks only to the configured provider (no proxies, no redirects)."""
    return httpx.AsyncClient(
        http2=http2,
        timeout=httpx.Timeout(timeout_s),
        verify=tls_context if tls_context is not None else True,
        follow_redirects=False,
        trust_env=False,
        # Provider answers are small JSON; nothing to decompress, nothing to fail decoding.
        headers={"accept-encoding": "identity"},
    )


async def post(
    client: httpx.AsyncClient,
    url: str,
    *,
    provider: str,
    idempotent: bool,
    headers: Mapping[str, str],
    content: bytes,
) -> httpx.Response:
    """POST and read the answer; transport failures become channel errors.

    Before a connection exists nothing was sent (transient). Once the request is on the wire,
    a missing answer means the provider may have acted on it (ambiguous; retried by the
    dispatcher only when the provider dedupes by our key, i.e. `idempotent`).
    """
    try:
        return await client.post(url, headers=dict(headers), content=content)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
        raise TransientChannelError(f"{provider} connect failed: {error!r}") from error
    except (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.InvalidURL) as error:
        raise PermanentChannelError(f"{provider} request invalid: {error!r}") from error
    except httpx.HTTPError as error:
        # Written (at least in part) but not answered in full (TransportError, or a body that
        # cannot be decoded): the provider may have acted on it.
        raise AmbiguousChannelError(
            f"{provider} sent but no response: {error!r}", retryable=idempotent
        ) from error


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The response body as a JSON object ({} when it is not one)."""
    try:
        document = json.loads(response.content)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def detail(response: httpx.Response) -> str:
    """A short printable excerpt of the response body for reasons and logs."""
    text = response.content[: _DETAIL_CHARS * 4].decode("utf-8", "replace")
    return " ".join(text.split())[:_DETAIL_CHARS]


def retry_after_s(response: httpx.Response) -> float | None:
    """Seconds the provider asked us to wait (`Retry-After`), if any."""
    return parse_retry_after(response.headers.get("retry-after"))


def status_error(response: httpx.Response, reason: str) -> ChannelError:
    """The default classification of a non-success answer: 408/425/429/5xx transient (with
    Retry-After), any other status permanent."""
    status = response.status_code
    if status in TRANSIENT_STATUS or status >= 500:
        return TransientChannelError(reason, retry_after_s=retry_after_s(response))
    return PermanentChannelError(reason)
