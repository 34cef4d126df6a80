"""Composition root of the ingest service: `python -m services.ingest`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

from nudge import bus, db, health, metrics, runtime
from nudge.auth import KeyVerifier
from nudge.clock import DbClock
from nudge.grpcserver import ServiceBinding, start_grpc_server
from nudge.ingest.v1 import ingest_pb2_grpc
from nudge.logs import setup_logging
from nudge.metrics import serve_metrics
from nudge.telemetry import setup_tracing
from services.ingest.application import GroupCommitter, RateLimiter
from services.ingest.grpc_api import IngestServicer
from services.ingest.relay import Relay
from services.ingest.settings import Settings

log = logging.getLogger("nudge.ingest")


async def main(stop: asyncio.Event) -> None:
    """Build → serve → drain."""
    settings = Settings.from_env()
    async with AsyncExitStack() as stack:
        pool = await db.create_pool(settings.database_url, max_size=8, application_name="ingest")
        stack.push_async_callback(pool.close)
        nc = await bus.connect(settings.nats_url, "nudge-ingest")
        stack.push_async_callback(nc.close)  # publishes are acked; nothing to drain
        js = nc.jetstream()
        names = bus.BusNames(settings.nats_prefix)
        await bus.ensure_streams(js, names)

        clock = DbClock(pool)
        await clock.sync()
        relay_wake = asyncio.Event()
        committer = GroupCommitter(pool, on_commit=relay_wake)
        relay = Relay(pool, js, names, relay_wake)
        supervisor = runtime.Supervisor(stop)
        stack.push_async_callback(supervisor.aclose)
        supervisor.start("clock", clock.run())
        supervisor.start("group-commit", committer.run())
        supervisor.start("relay", relay.run(settings.database_url))

        servicer = IngestServicer(
            KeyVerifier(pool),
            committer,
            RateLimiter(settings.rate_events_per_s, settings.rate_burst_events),
            clock,
        )
        server = await start_grpc_server(
            settings.address,
            [
                ServiceBinding(
                    ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                    servicer,
                    "nudge.ingest.v1.IngestService",
                )
            ],
        )
        readiness = health.Readiness(
            server, [health.database(pool), health.jetstream(nc, js, names.events_stream)]
        )
        supervisor.start("readiness", readiness.run())
        samplers = [metrics.reader_lag_sampler(pool, "relay")]
        supervisor.start("metrics", metrics.run_samplers(samplers))
        log.info("ingest serving on %s", settings.address)
        await stop.wait()
        log.info("ingest draining")
        await server.drain()
    if supervisor.failure is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    setup_logging("ingest")
    setup_tracing("ingest")
    serve_metrics("ingest")
    runtime.run(main)
