"""pytest fixtures for tests against a real Postgres and a real NATS JetStream server.

Register from the root ``tests/conftest.py`` with ``pytest_plugins = ["nudge.testing.fixtures"]``
(or ``pytest -p nudge.testing.fixtures``).

Postgres: one server per test session (embedded, or the server at ``$NUDGE_TEST_DATABASE_URL``,
a superuser/CREATEDB URL of its maintenance database). The migrations run once into the template
database ``nudge_template``; every test that asks for `database_url` gets a fresh database cloned
from it (``CREATE DATABASE ... TEMPLATE``), dropped ``WITH (FORCE)`` afterwards.

NATS: one nats-server per session; `nats_url` restarts it if a test stopped it, and deletes every
JetStream stream after the test, so fixed stream names (``NUDGE_EVENTS``...) start empty in each
test. Use `test_id` to make subjects and names unique where that matters.

All fixtures are synchronous; the little async work they do (asyncpg, nats-py) runs in a private
event loop in a worker thread, so it never touches the event loops pytest-asyncio gives tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import nats
import pytest

from nudge.dev.stack import NatsHandle, PostgresHandle, start_nats, start_postgres, with_database

__all__ = [
    "DATABASE_URL_ENV",
    "TEMPLATE_DATABASE",
    "PgServer",
    "database_factory",
    "database_url",
    "nats_server",
    "nats_url",
    "pg_data_dir",
    "pg_migrator",
    "pg_server",
    "pg_template",
    "run_async",
    "test_id",
]

DATABASE_URL_ENV = "NUDGE_TEST_DATABASE_URL"
TEMPLATE_DATABASE = "nudge_template"

T = TypeVar("T")
Migrator = Callable[[str], Awaitable[object]]


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion in a fresh event loop on a worker thread; return its result."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nudge-fixture") as pool:
        return pool.submit(asyncio.run, coro).result()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@dataclass(frozen=True)
class PgServer:
    """The session's Postgres server: `dsn` is a superuser URL of its ``postgres`` database."""

    dsn: str
    handle: PostgresHandle | None = None
    """The embedded server, or None when the tests use ``$NUDGE_TEST_DATABASE_URL``."""

    def dsn_for(self, database: str) -> str:
        """The same server and credentials, another database."""
        return with_database(self.dsn, database)


def _private_tmp_dir(prefix: str) -> Path:
    # Not under pytest's basetemp: as root the data dir must be reachable by the postgres system
    # user, and pytest resets /tmp/pytest-of-<user> to 0700 whenever a session starts.
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One Postgres for the session: embedded in a temp dir, or ``$NUDGE_TEST_DATABASE_URL``."""
    external = os.environ.get(DATABASE_URL_ENV)
    if external:
        yield PgServer(dsn=external)
        return
    data_dir = _private_tmp_dir("nudge-test-pg-")
    try:
        handle = start_postgres(data_dir)
        try:
            yield PgServer(dsn=handle.dsn, handle=handle)
        finally:
            handle.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_migrator() -> Migrator:
    """The coroutine function that migrates the template (override it to test other schemas)."""
    from nudge.migrate import apply_migrations

    return apply_migrations


def _template_name() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # one template per xdist worker
    return f"{TEMPLATE_DATABASE}_{worker}" if worker else TEMPLATE_DATABASE


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer, pg_migrator: Migrator) -> Iterator[str]:
    """Name of the migrated template database (created fresh for the session)."""
    name = _template_name()
    drop = f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)"

    async def create() -> None:
        await _admin(pg_server.dsn, drop, f"CREATE DATABASE {_ident(name)}")
        await pg_migrator(pg_server.dsn_for(name))

    run_async(create())
    yield name
    run_async(_admin(pg_server.dsn, drop))


@pytest.fixture
def database_factory(
    pg_server: PgServer, pg_template: str, test_id: str
) -> Iterator[Callable[[], str]]:
    """Call it for the URL of one more fresh migrated database; all are dropped after the test."""
    created: list[str] = []

    def create() -> str:
        name = f"nudge_test_{test_id}_{len(created)}"
        run_async(
            _admin(pg_server.dsn, f"CREATE DATABASE {_ident(name)} TEMPLATE {_ident(pg_template)}")
        )
        created.append(name)
        return pg_server.dsn_for(name)

    yield create
    drops = [f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)" for name in created]
    if drops:
        run_async(_admin(pg_server.dsn, *drops))


@pytest.fixture
def database_url(database_factory: Callable[[], str]) -> str:
    """URL of a fresh database with all migrations applied, private to this test."""
    return database_factory()


@pytest.fixture
def pg_data_dir() -> Iterator[Path]:
    """An empty directory for a test's own `start_postgres` (crash/restart tests); removed after."""
    path = _private_tmp_dir("nudge-test-pgdata-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsHandle]:
    """One nats-server with JetStream for the session."""
    handle = start_nats(tmp_path_factory.mktemp("nats"))
    try:
        yield handle
    finally:
        handle.stop()


async def _delete_all_streams(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        jsm = nc.jsm()
        while True:
            infos = await jsm.streams_info()
            if not infos:
                break
            for info in infos:
                await jsm.delete_stream(info.config.name or "")
    finally:
        await nc.close()


@pytest.fixture
def nats_url(nats_server: NatsHandle) -> Iterator[str]:
    """URL of the session's nats-server; every JetStream stream is deleted after the test."""
    if not nats_server.is_running:
        nats_server.restart()
    yield nats_server.url
    if not nats_server.is_running:
        nats_server.restart()
    run_async(_delete_all_streams(nats_server.url))


@pytest.fixture
def test_id() -> str:
    """A short unique hex id for this test: use it in subjects, stream and consumer names."""
    return uuid.uuid4().hex[:12]
