"""End-to-end fixtures: the four services as processes, an API key, real SMTP/HTTP peers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from nudge.auth import create_api_key, ensure_workspace
from nudge.testing.fixtures import run_async
from nudge.testing.services import ServiceProcesses
from nudge.testing.sinks import HttpSink, SmtpSink


@dataclass
class Stack:
    """A running stack for one test."""

    services: ServiceProcesses
    api_key: str
    workspace_id: str
    database_url: str
    smtp: SmtpSink
    http: HttpSink

    def address(self, name: str) -> str:
        """gRPC address of a service."""
        return self.services.addresses[name]


async def _make_key(database_url: str, workspace_id: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        await ensure_workspace(conn, workspace_id)
        await conn.execute("UPDATE dev_clock SET enabled = true")
        return await create_api_key(conn, workspace_id)
    finally:
        await conn.close()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def http_sink() -> Iterator[HttpSink]:
    sink = HttpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def stack_env() -> dict[str, str]:
    """Extra environment for the services; a test module overrides it (e.g. provider URLs)."""
    return {}


@pytest.fixture
def stack_tracking() -> bool:
    """Whether dispatch tracks opens and clicks; a test module overrides it."""
    return False


@pytest.fixture
def stack(
    database_url: str,
    nats_url: str,
    test_id: str,
    tmp_path: Path,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
    stack_env: dict[str, str],
    stack_tracking: bool,
) -> Iterator[Stack]:
    workspace_id = f"ws-{test_id}"
    api_key = run_async(_make_key(database_url, workspace_id))
    services = ServiceProcesses.configure(
        database_url=database_url,
        nats_url=nats_url,
        nats_prefix=f"t{test_id}",
        log_dir=tmp_path / "logs",
        extra_env={"NUDGE_SMTP_URL": smtp_sink.url, **stack_env},
        tracking=stack_tracking,
    )
    try:
        services.start_all()
        yield Stack(services, api_key, workspace_id, database_url, smtp_sink, http_sink)
    finally:
        services.stop_all()
    exit_codes = {name: p.returncode for name, p in services.processes.items()}
    assert exit_codes == dict.fromkeys(exit_codes, 0), f"unclean drain: {exit_codes}"
