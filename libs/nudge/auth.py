"""API keys: `nk_<key_id>_<secret>`, stored as sha256(secret), scoped, per workspace."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import asyncpg

from nudge.db import Queryable

KEY_PATTERN = re.compile(r"^nk_([a-z0-9]{12})_([A-Za-z0-9_-]{32,64})$")
SCOPES = frozenset({"track", "admin"})


class AuthError(Exception):
    """Base of authentication and authorization failures."""


class UnauthenticatedError(AuthError):
    """The key is missing, malformed, unknown, revoked or expired."""


class PermissionDeniedError(AuthError):
    """The key is valid but lacks the scope."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"API key lacks the {scope!r} scope")
        self.scope = scope


@dataclass(frozen=True)
class Principal:
    """Who is calling: the workspace and scopes of a verified key."""

    workspace_id: str
    key_id: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        """Raise PermissionDeniedError unless the key has `scope`."""
        if scope not in self.scopes:
            raise PermissionDeniedError(scope)


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def create_api_key(
    conn: Queryable,
    workspace_id: str,
    scopes: frozenset[str] = SCOPES,
    description: str = "",
) -> str:
    """Create a key for `workspace_id`; return the full key (shown once, stored hashed)."""
    unknown = scopes - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes: {sorted(unknown)}")
    key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    secret = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO api_keys (key_id, workspace_id, secret_hash, scopes, description)"
        " VALUES ($1, $2, $3, $4, $5)",
        key_id,
        workspace_id,
        _hash(secret),
        sorted(scopes),
        description,
    )
    return f"nk_{key_id}_{secret}"


async def ensure_workspace(conn: Queryable, workspace_id: str, name: str = "") -> None:
    """Create the workspace if it does not exist."""
    await conn.execute(
        "INSERT INTO workspaces (workspace_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        workspace_id,
        name or workspace_id,
    )


class KeyVerifier:
    """Verifies bearer keys against the database, caching verified keys for a short TTL."""

    def __init__(self, pool: asyncpg.Pool, ttl_s: float = 30.0) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def verify(self, authorization: str | None) -> Principal:
        """Return the principal for an `authorization: Bearer <key>` header value."""
        if not authorization or not authorization.startswith("Bearer "):
            raise UnauthenticatedError("missing `authorization: Bearer <api key>` metadata")
        key = authorization[len("Bearer ") :].strip()
        match = KEY_PATTERN.match(key)
        if not match:
            raise UnauthenticatedError("malformed API key")
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            principal = await self._lookup(match[1], match[2])
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now + self._ttl_s, principal)
        if principal is None:
            raise UnauthenticatedError("unknown, revoked or expired API key")
        return principal

    async def _lookup(self, key_id: str, secret: str) -> Principal | None:
        row = await self._pool.fetchrow(
            "SELECT workspace_id, secret_hash, scopes FROM api_keys"
            " WHERE key_id = $1 AND revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > nudge_now())",
            key_id,
        )
        if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), _hash(secret)):
            return None
        return Principal(row["workspace_id"], key_id, frozenset(row["scopes"]))
