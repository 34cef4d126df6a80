"""Composition root of the rules service: `python -m services.rules`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from datetime import timedelta

from nudge import bus, db, health, metrics, runtime
from nudge.auth import KeyVerifier
from nudge.grpcserver import ServiceBinding, insecure_channel, start_grpc_server
from nudge.logs import setup_logging
from nudge.metrics import serve_metrics
from nudge.rules.v1 import rules_pb2_grpc
from nudge.scheduler.v1 import scheduler_pb2_grpc
from nudge.telemetry import setup_tracing
from services.rules.application import (
    CampaignAdmin,
    CampaignCache,
    Planner,
    Projector,
    TimerHandler,
    UserViews,
)
from services.rules.consumers import (
    TIMERS_DURABLE,
    consume_fired_timers,
    project_forever,
    subscribe_wakeups,
)
from services.rules.grpc_api import RulesServicer
from services.rules.outbox import OutboxWorker
from services.rules.settings import Settings

log = logging.getLogger("nudge.rules")


async def main(stop: asyncio.Event) -> None:
    """Build → serve → drain."""
    settings = Settings.from_env()
    async with AsyncExitStack() as stack:
        pool = await db.create_pool(settings.database_url, max_size=8, application_name="rules")
        stack.push_async_callback(pool.close)
        nc = await bus.connect(settings.nats_url, "nudge-rules")
        stack.push_async_callback(nc.close)  # publishes are acked; nothing to drain
        js = nc.jetstream()
        names = bus.BusNames(settings.nats_prefix)
        await bus.ensure_streams(js, names)
        channel = insecure_channel(settings.scheduler_address)
        stack.push_async_callback(channel.close)

        projection_wake = asyncio.Event()
        outbox_wake = asyncio.Event()
        cache = CampaignCache()
        fire_margin = timedelta(seconds=settings.fire_margin_s)
        planner = Planner(names, fire_margin=fire_margin)
        projector = Projector(
            pool, cache, planner, batch_size=settings.batch_size, on_effects=outbox_wake
        )
        timers = TimerHandler(pool, cache, planner, on_effects=outbox_wake)
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        outbox = OutboxWorker(pool, js, scheduler, outbox_wake)
        await subscribe_wakeups(nc, names, projection_wake)

        supervisor = runtime.Supervisor(stop)
        stack.push_async_callback(supervisor.aclose)
        supervisor.start("projection", project_forever(projector, projection_wake))
        supervisor.start(
            "timers", consume_fired_timers(js, names, timers, ack_wait_s=settings.ack_wait_s)
        )
        supervisor.start("outbox", outbox.run())

        admin = CampaignAdmin(pool, fire_margin=fire_margin, on_effects=outbox_wake)
        servicer = RulesServicer(pool, KeyVerifier(pool), admin, UserViews(pool))
        server = await start_grpc_server(
            settings.address,
            [
                ServiceBinding(
                    rules_pb2_grpc.add_RulesServiceServicer_to_server,
                    servicer,
                    "nudge.rules.v1.RulesService",
                )
            ],
        )
        readiness = health.Readiness(
            server,
            [
                health.database(pool),
                health.jetstream(nc, js, names.events_stream),
                health.consumer(js, names.timers_stream, TIMERS_DURABLE),
            ],
        )
        supervisor.start("readiness", readiness.run())
        samplers = [
            metrics.reader_lag_sampler(pool, "rules"),
            metrics.consumer_sampler(js, names.timers_stream, TIMERS_DURABLE),
        ]
        supervisor.start("metrics", metrics.run_samplers(samplers))
        log.info("rules serving on %s", settings.address)
        await stop.wait()
        log.info("rules draining")
        await server.drain()
    if supervisor.failure is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    setup_logging("rules")
    setup_tracing("rules")
    serve_metrics("rules")
    runtime.run(main)
