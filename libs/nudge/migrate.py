"""Versioned SQL migrations, applied in order, once, safely from concurrent processes."""

from __future__ import annotations

from importlib import resources

import asyncpg

from nudge.db import Conn, Queryable

_LOCK_KEY = 0x6E756467  # "nudg": serializes concurrent `nudge migrate` runs


def migration_files() -> list[tuple[str, str]]:
    """Return (name, sql) for every migration shipped with the package, in order."""
    folder = resources.files("nudge") / "migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name, (folder / name).read_text(encoding="utf-8")) for name in names]


async def apply_migrations(dsn: str) -> list[str]:
    """Apply pending migrations to the database at `dsn`; return the names applied now."""
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations_on(conn)
    finally:
        await conn.close()


async def apply_migrations_on(conn: Conn) -> list[str]:
    """Apply pending migrations on an open connection (holding a session advisory lock)."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   name text PRIMARY KEY,
                   applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"""
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        applied: list[str] = []
        for name, sql in migration_files():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def is_migrated(conn: Queryable) -> bool:
    """True when every shipped migration has been applied (used by readiness checks)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return False
    done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
    return all(name in done for name, _ in migration_files())
