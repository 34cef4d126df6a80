"""Composition root of the scheduler service: `python -m services.scheduler`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

from nudge import bus, db, health, metrics, runtime
from nudge.grpcserver import ServiceBinding, start_grpc_server
from nudge.logs import setup_logging
from nudge.metrics import serve_metrics
from nudge.scheduler.v1 import scheduler_pb2_grpc
from nudge.telemetry import setup_tracing
from services.scheduler.application import FiringLoop, Timers
from services.scheduler.grpc_api import SchedulerServicer
from services.scheduler.settings import Settings
from services.scheduler.store import pending_counts

log = logging.getLogger("nudge.scheduler")

SERVICE_NAME = "nudge.scheduler.v1.SchedulerService"


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Build → serve until `stop` is set → drain."""
    async with AsyncExitStack() as stack:
        pool = await db.create_pool(settings.database_url, max_size=8, application_name="scheduler")
        stack.push_async_callback(pool.close)
        nc = await bus.connect(settings.nats_url, "nudge-scheduler")
        stack.push_async_callback(nc.close)  # publishes are acked; nothing to drain
        js = nc.jetstream()
        names = bus.BusNames(settings.nats_prefix)
        await bus.ensure_streams(js, names)

        firing = FiringLoop(
            pool,
            js,
            names,
            listen_dsn=settings.database_url,
            batch_size=settings.batch_size,
            max_idle_s=settings.max_idle_s,
        )
        supervisor = runtime.Supervisor(stop)
        stack.push_async_callback(supervisor.aclose)
        supervisor.start("firing", firing.run())

        server = await start_grpc_server(
            settings.address,
            [
                ServiceBinding(
                    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server,
                    SchedulerServicer(Timers(pool)),
                    SERVICE_NAME,
                )
            ],
        )
        readiness = health.Readiness(
            server, [health.database(pool), health.jetstream(nc, js, names.timers_stream)]
        )
        supervisor.start("readiness", readiness.run())
        supervisor.start(
            "metrics", metrics.run_samplers([metrics.timers_sampler(lambda: pending_counts(pool))])
        )
        log.info("scheduler serving on %s", settings.address)
        await stop.wait()
        log.info("scheduler draining")
        await server.drain()
    if supervisor.failure is not None:
        raise SystemExit(1)


async def main(stop: asyncio.Event) -> None:
    """Read the settings, then serve."""
    await serve(Settings.from_env(), stop)


if __name__ == "__main__":
    setup_logging("scheduler")
    setup_tracing("scheduler")
    serve_metrics("scheduler")
    runtime.run(main)
