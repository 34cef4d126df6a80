"""`nudge migrate` is safe to run twice and concurrently (a session advisory lock)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from nudge.migrate import is_migrated, migration_files
from nudge.testing.fixtures import PgServer, run_async

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def empty_database(pg_server: PgServer, test_id: str) -> Iterator[str]:
    """A fresh database with no schema at all (not cloned from the migrated template)."""
    name = f"nudge_empty_{test_id}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(pg_server.dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    run_async(admin(f'CREATE DATABASE "{name}"'))
    yield pg_server.dsn_for(name)
    run_async(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _start_migrate(database_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "nudge.cli", "migrate"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _migrated(database_url: str) -> tuple[bool, list[str]]:
    conn = await asyncpg.connect(database_url)
    try:
        names = [
            r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")
        ]
        return await is_migrated(conn), names
    finally:
        await conn.close()


def test_three_concurrent_migrate_runs_apply_each_migration_exactly_once(
    empty_database: str,
) -> None:
    runs = [_start_migrate(empty_database) for _ in range(3)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs

    names = [name for name, _ in migration_files()]
    applied = [
        [line.removeprefix("applied ") for line in out.splitlines() if line.startswith("applied ")]
        for out, _ in outputs
    ]
    assert sorted(applied, key=len) == [[], [], names]  # one run applied all, in order
    up_to_date = f"up to date ({len(names)} migrations)"
    assert sum(out.strip() == up_to_date for out, _ in outputs) == 2
    assert run_async(_migrated(empty_database)) == (True, names)

    again = _start_migrate(empty_database)
    out, err = again.communicate(timeout=60)
    assert (again.returncode, out.strip()) == (0, up_to_date), err
