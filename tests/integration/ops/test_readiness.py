"""Readiness follows the database, the schema and NATS both ways, and a drain is final."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from nudge import bus, db, health
from nudge.dev.stack import NatsHandle, PostgresHandle, start_postgres
from nudge.grpcserver import start_grpc_server
from nudge.migrate import apply_migrations


class RecordingServer:
    """Stands in for GrpcServer: remembers what it was told."""

    def __init__(self) -> None:
        self.reported: list[bool] = []

    async def set_serving(self, serving: bool) -> None:
        self.reported.append(serving)


async def _until(readiness: health.Readiness, expected: bool, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await readiness.check_once() is not expected:
        assert loop.time() < deadline, f"still {not expected}: {readiness.failures}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def own_postgres(pg_data_dir: Path) -> AsyncIterator[PostgresHandle]:
    """A Postgres of this test's own, so the test can stop it (no migrations yet)."""
    handle = start_postgres(pg_data_dir, tcp_port=0)
    try:
        yield handle
    finally:
        handle.stop()


async def test_not_ready_until_migrated_and_while_the_database_is_down(
    own_postgres: PostgresHandle,
) -> None:
    dsn = own_postgres.tcp_dsn
    assert dsn is not None
    pool = await db.create_pool(dsn, max_size=2)
    server = RecordingServer()
    readiness = health.Readiness(server, [health.database(pool)], interval_s=0.1, timeout_s=1.0)
    try:
        assert await readiness.check_once() is False
        assert "not migrated" in readiness.failures["database"]

        await apply_migrations(dsn)
        assert await readiness.check_once() is True

        own_postgres.stop()
        await _until(readiness, False)
        assert set(readiness.failures) == {"database"}

        own_postgres.restart()
        await _until(readiness, True)
        assert server.reported == [False, True, False, True]
    finally:
        await pool.close()


async def test_not_ready_while_nats_is_down_and_until_the_consumer_exists(
    nats_server: NatsHandle, nats_url: str, test_id: str
) -> None:
    nc = await bus.connect(nats_url, "readiness-test")
    js = nc.jetstream()
    names = bus.BusNames(f"t{test_id}")
    await bus.ensure_streams(js, names)
    durable = "readiness"
    server = RecordingServer()
    readiness = health.Readiness(
        server,
        [
            health.jetstream(nc, js, names.dispatch_stream),
            health.consumer(js, names.dispatch_stream, durable),
        ],
        interval_s=0.1,
        timeout_s=1.0,
    )
    try:
        assert await readiness.check_once() is False
        assert set(readiness.failures) == {f"consumer:{durable}"}
        subject = f"{names.prefix}.dispatch.>"
        await js.pull_subscribe(
            subject, durable=durable, config=bus.work_queue_consumer(durable, subject)
        )
        assert await readiness.check_once() is True

        await asyncio.to_thread(nats_server.stop)
        await _until(readiness, False)
        assert "nats" in readiness.failures

        await asyncio.to_thread(nats_server.restart)
        await _until(readiness, True)
        assert server.reported == [False, True, False, True]
    finally:
        await nc.close()


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = await check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    return int(response.status)


async def test_the_server_reports_readiness_and_stays_not_serving_once_draining() -> None:
    healthy = True

    async def probe() -> None:
        if not healthy:
            raise health.NotReadyError("dependency down")

    server = await start_grpc_server("127.0.0.1:0", [])
    address = f"127.0.0.1:{server.port}"
    readiness = health.Readiness(server, [health.Check("dependency", probe)], interval_s=0.05)
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    task = asyncio.create_task(readiness.run())
    try:
        assert await _eventually(address, serving)
        healthy = False
        assert await _eventually(address, not_serving)
        healthy = True
        assert await _eventually(address, serving)

        healthy = False
        assert await _eventually(address, not_serving)
        stop = asyncio.create_task(server.drain(grace_s=1.0))
        healthy = True  # the checks pass again while the server drains...
        await asyncio.sleep(0.3)
        await stop
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert readiness.ready is True
    # ...yet the server stayed NOT_SERVING: graceful-shutdown mode ignored the update.
    assert server.health._server_status[""] == not_serving


async def _eventually(address: str, status: int, timeout_s: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await _health(address) != status:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
