"""The machine's limits that `make bench` compares the system against, measured in the same run
on the same Postgres and nats-server (the services are not running yet, except for gRPC)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import nats
from grpc_health.v1 import health_pb2
from nats.js.api import StorageType, StreamConfig


def _events_like_rows(count: int) -> list[tuple[Any, ...]]:
    now = datetime.now(UTC)
    properties = json.dumps({"path": "/products/1234", "referrer": "search", "ms": 42})
    return [
        (
            "bench",
            f"copy-{i}",
            f"u{i * 7919 % 10_000}",
            "page_viewed",
            now,
            properties,
            "{}",
            "{}",
            b"\x00" * 32,
        )
        for i in range(count)
    ]


_COPY_COLUMNS = (
    "workspace_id",
    "event_id",
    "user_id",
    "name",
    "occurred_at",
    "properties",
    "context",
    "metadata",
    "body_hash",
)


async def pg_copy(dsn: str, rows: int, runs: int) -> dict[str, Any]:
    """COPY `rows` events-shaped rows per run over one connection, into two LOGGED scratch
    tables: `LIKE events INCLUDING ALL` (same columns, defaults, identity, primary key, unique
    (workspace_id, event_id) and both secondary indexes: the headline figure) and the same
    without any index. Each COPY is one transaction (one fsync at its commit)."""
    records = _events_like_rows(rows)
    conn = await asyncpg.connect(dsn)
    results: dict[str, list[float]] = {"indexed": [], "no_index": []}
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_copy_indexed, bench_copy_no_index")
        await conn.execute("CREATE TABLE bench_copy_indexed (LIKE events INCLUDING ALL)")
        await conn.execute(
            "CREATE TABLE bench_copy_no_index (LIKE events INCLUDING DEFAULTS INCLUDING IDENTITY)"
        )
        for _ in range(runs):
            for variant in ("indexed", "no_index"):
                table = f"bench_copy_{variant}"
                await conn.execute(f"TRUNCATE {table}")
                await conn.execute("CHECKPOINT")
                started = time.perf_counter()
                await conn.copy_records_to_table(table, records=records, columns=_COPY_COLUMNS)
                results[variant].append(rows / (time.perf_counter() - started))
    finally:
        await conn.execute("DROP TABLE IF EXISTS bench_copy_indexed, bench_copy_no_index")
        await conn.close()
    return {
        "value": statistics.median(results["indexed"]),
        "runs": results["indexed"],
        "detail": {
            "table": "LOGGED, LIKE events INCLUDING ALL (PK, unique, 2 indexes), 1 COPY = 1 txn",
            "rows_per_run": rows,
            "no_index_rows_per_s": statistics.median(results["no_index"]),
            "no_index_runs": results["no_index"],
            "client": "asyncpg copy_records_to_table, one connection",
        },
    }


async def jetstream_publish(
    nats_url: str, seconds: float, window: int, sync_seconds: float, payload_bytes: int
) -> dict[str, Any]:
    """Async publishes (acks awaited per window of `window` messages) for two runs of `seconds`
    each, then one-at-a-time publishes for `sync_seconds`, to a scratch FILE stream on the
    bench's nats-server (sync_interval: always, so every ack follows an fsync)."""
    nc = await nats.connect(nats_url, name="nudge-bench-limits")
    js = nc.jetstream()
    stream = "BENCH_LIMIT"
    payload = b"x" * payload_bytes
    runs: list[float] = []
    counts: list[int] = []
    try:
        await js.add_stream(
            StreamConfig(name=stream, subjects=["benchlimit.>"], storage=StorageType.FILE)
        )
        # Warm up (stream file creation, connection buffers).
        await asyncio.gather(*[await js.publish_async("benchlimit.a", payload) for _ in range(200)])
        for _ in range(2):
            started = time.perf_counter()
            sent = 0
            while time.perf_counter() - started < seconds:
                futures = [await js.publish_async("benchlimit.a", payload) for _ in range(window)]
                await asyncio.gather(*futures)
                sent += len(futures)
            runs.append(sent / (time.perf_counter() - started))
            counts.append(sent)
        sync_count = 0
        started = time.perf_counter()
        while time.perf_counter() - started < sync_seconds:
            await js.publish("benchlimit.s", payload)
            sync_count += 1
        sync_rate = sync_count / (time.perf_counter() - started)
    finally:
        try:
            await js.delete_stream(stream)
        finally:
            await nc.close()
    return {
        "value": statistics.median(runs),
        "runs": runs,
        "detail": {
            "mode": f"publish_async, acks awaited every {window} messages, ~{seconds}s per run",
            "messages_per_run": counts,
            "payload_bytes": payload_bytes,
            "sync_one_at_a_time_per_s": sync_rate,
            "stream": "FILE storage, nats-server sync_interval: always",
            "client": "nats-py in the bench process (may itself be the limit)",
        },
    }


async def grpc_roundtrip(address: str, calls: int) -> dict[str, Any]:
    """Sequential grpc.health.v1 Check round trips to a running (idle) service."""
    async with grpc.aio.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        request = health_pb2.HealthCheckRequest(service="")
        for _ in range(50):
            await check(request, timeout=5)
        samples: list[float] = []
        for _ in range(calls):
            started = time.perf_counter()
            await check(request, timeout=5)
            samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "value": statistics.median(samples),
        "runs": [statistics.median(samples)],
        "detail": {
            "calls": calls,
            "p99_ms": samples[int(0.99 * (len(samples) - 1))],
            "target": f"ingest service health Check at {address} (grpc.aio client, idle system)",
        },
    }


async def pg_commit(dsn: str, commits: int) -> dict[str, Any]:
    """Sequential one-row INSERT commits over one connection: the price of one fsync'ed commit
    (WAL flush), which every stage of the trigger path pays at least once."""
    conn = await asyncpg.connect(dsn)
    samples: list[float] = []
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_commit")
        await conn.execute("CREATE TABLE bench_commit (id bigint)")
        for i in range(commits):
            started = time.perf_counter()
            await conn.execute("INSERT INTO bench_commit VALUES ($1)", i)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await conn.execute("DROP TABLE IF EXISTS bench_commit")
        await conn.close()
    samples.sort()
    return {
        "value": statistics.median(samples),
        "runs": [statistics.median(samples)],
        "detail": {
            "commits": commits,
            "p90_ms": samples[int(0.9 * (len(samples) - 1))],
            "p99_ms": samples[int(0.99 * (len(samples) - 1))],
            "what": "autocommit INSERT of one row, synchronous_commit=on, fsync=on",
        },
    }
