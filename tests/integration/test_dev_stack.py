"""The embedded dev stack and the test fixtures: real Postgres, real nats-server with JetStream.

Run: pytest -p nudge.testing.fixtures tests/integration/test_dev_stack.py
(the root tests/conftest.py registers the plugin for a full run).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StreamConfig

from nudge.dev.stack import free_port, start_nats, start_postgres
from nudge.testing.fixtures import PgServer


async def test_postgres_starts_and_asyncpg_connects(pg_server: PgServer) -> None:
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        assert await conn.fetchval("select 1") == 1
        if pg_server.handle is not None:  # our settings, not those of an external server
            assert await conn.fetchval("show fsync") == "on"
            assert int(await conn.fetchval("show max_connections")) >= 200
    finally:
        await conn.close()


async def test_database_url_is_migrated(database_url: str, pg_template: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("select current_database()") != pg_template
        applied = await conn.fetchval("select count(*) from schema_migrations")
        assert applied > 0
    finally:
        await conn.close()


async def test_per_test_databases_are_independent(database_factory: Callable[[], str]) -> None:
    first, second = database_factory(), database_factory()
    assert first != second
    a = await asyncpg.connect(first)
    b = await asyncpg.connect(second)
    try:
        await a.execute("create table probe (v int)")
        await a.execute("insert into probe values (1)")
        assert await a.fetchval("select count(*) from probe") == 1
        assert await b.fetchval("select to_regclass('probe')") is None
    finally:
        await a.close()
        await b.close()


async def test_postgres_restart_keeps_data(pg_data_dir: Path) -> None:
    pg = start_postgres(pg_data_dir, tcp_port=0)
    try:
        conn = await asyncpg.connect(pg.dsn)
        await conn.execute("create table kept (v text)")
        await conn.execute("insert into kept values ('before restart')")
        await conn.close()

        pg.restart()  # clean shutdown, same data dir
        conn = await asyncpg.connect(pg.dsn)
        assert await conn.fetchval("select v from kept") == "before restart"
        await conn.execute("insert into kept values ('before crash')")
        await conn.close()

        pg.kill()  # crash: committed data survives through WAL recovery
        assert not pg.is_running
        pg.restart()
        assert pg.tcp_dsn is not None
        conn = await asyncpg.connect(pg.tcp_dsn)
        assert await conn.fetchval("select count(*) from kept") == 2
        await conn.close()

        pg.stop()  # a second start_postgres on the same directory reuses the cluster
        again = start_postgres(pg_data_dir)
        try:
            conn = await asyncpg.connect(again.dsn)
            assert await conn.fetchval("select count(*) from kept") == 2
            await conn.close()
        finally:
            again.stop()
    finally:
        pg.stop()


def test_nats_server_is_healthy_with_jetstream(nats_url: str, nats_server: object) -> None:
    from nudge.dev.stack import NatsHandle

    assert isinstance(nats_server, NatsHandle)
    assert nats_url == nats_server.url
    with urllib.request.urlopen(f"{nats_server.monitor_url}/varz", timeout=5) as response:
        varz = json.load(response)
    assert varz["jetstream"]["config"]["sync_always"] is True


async def test_jetstream_publish_ack_and_dedupe(nats_url: str, test_id: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        stream = f"T_{test_id}"
        subject = f"test.{test_id}.events"
        await js.add_stream(StreamConfig(name=stream, subjects=[subject], duplicate_window=600))
        first = await js.publish(subject, b"one", headers={"Nats-Msg-Id": "m-1"})
        assert first.stream == stream
        assert first.seq == 1
        assert not first.duplicate
        again = await js.publish(subject, b"one again", headers={"Nats-Msg-Id": "m-1"})
        assert again.duplicate is True
        assert again.seq == 1
        other = await js.publish(subject, b"two", headers={"Nats-Msg-Id": "m-2"})
        assert other.seq == 2
        info = await js.stream_info(stream)
        assert info.state.messages == 2
    finally:
        await nc.close()


async def test_nats_restart_keeps_stream_messages(tmp_path: Path, test_id: str) -> None:
    server = start_nats(tmp_path / "nats", port=free_port())
    try:
        stream, subject = f"K_{test_id}", f"keep.{test_id}"
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
        for i in range(3):
            await js.publish(subject, f"m{i}".encode(), headers={"Nats-Msg-Id": f"id-{i}"})
        await nc.close()

        port = server.port
        server.kill()  # crash, no graceful shutdown: acked messages were fsynced
        server.restart()
        assert server.port == port

        nc = await nats.connect(server.url)
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.state.messages == 3
        msg = await js.get_msg(stream, 2)
        assert msg.data == b"m1"
        # the dedupe window survives the restart too
        ack = await js.publish(subject, b"dup", headers={"Nats-Msg-Id": "id-0"})
        assert ack.duplicate is True
        await nc.close()

        server.stop()  # graceful stop, then restart
        server.restart()
        nc = await nats.connect(server.url)
        assert (await nc.jetstream().stream_info(stream)).state.messages == 3
        await nc.close()
    finally:
        server.stop()


@pytest.mark.parametrize("round_", [1, 2])
async def test_nats_url_starts_with_no_streams(nats_url: str, round_: int) -> None:
    # The same fixed stream name in two tests: the fixture deletes streams between tests.
    nc = await nats.connect(nats_url)
    try:
        jsm = nc.jsm()
        assert await jsm.streams_info() == []
        await jsm.add_stream(StreamConfig(name="NUDGE_FIXED", subjects=["fixed.>"]))
    finally:
        await nc.close()
