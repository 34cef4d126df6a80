"""asyncpg pools with the session limits every service role runs under (RELIABILITY.md P1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn = asyncpg.Connection | PoolConnectionProxy
"""A connection, pooled or not (for work inside a transaction)."""
Queryable = asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool
"""Anything that runs a statement."""

SESSION_SETTINGS = {
    # A transaction idling forever would stall every gap-free reader behind its xid.
    "idle_in_transaction_session_timeout": "30s",
    "statement_timeout": "10s",
    "lock_timeout": "5s",
    "timezone": "UTC",
}


async def _init_connection(conn: Conn) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=_json_dumps, decoder=_json_loads, schema="pg_catalog"
    )


def _json_dumps(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_loads(text: str) -> Any:
    import json

    return json.loads(text)


async def _keep_session(conn: Conn) -> None:
    """Pool connections are returned as they are (an open transaction is still rolled back).

    asyncpg's default reset runs `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`
    on every release: a round trip costing ≈ 100 µs of latency and 50 µs of client CPU per
    acquire on this machine. Pooled connections never hold session state: advisory locks are
    transaction-scoped (`pg_advisory_xact_lock`), settings are `SET LOCAL`, cursors live in
    transactions, and LISTEN and session locks use dedicated connections (`connect`)."""
    return None


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, application_name: str = "nudge"
) -> asyncpg.Pool:
    """Create a pool whose connections carry the service session limits and a jsonb codec."""
    settings = {**SESSION_SETTINGS, "application_name": application_name}
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings=settings,
        init=_init_connection,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


async def connect(dsn: str, *, application_name: str = "nudge") -> asyncpg.Connection:
    """Open one connection with the same settings as pool connections (for LISTEN, locks)."""
    conn = await asyncpg.connect(
        dsn, server_settings={**SESSION_SETTINGS, "application_name": application_name}
    )
    await _init_connection(conn)
    return conn


async def db_now(conn: Queryable) -> datetime:
    """The time authority: the database clock including the dev clock skew."""
    value = await conn.fetchval("SELECT nudge_now()")
    assert isinstance(value, datetime)
    return value
