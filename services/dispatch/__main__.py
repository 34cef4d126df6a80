"""Composition root of the dispatch service: `python -m services.dispatch`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from datetime import timedelta

from nudge import bus, db, health, metrics, runtime
from nudge.auth import KeyVerifier
from nudge.clock import DbClock
from nudge.dispatch.v1 import dispatch_pb2_grpc
from nudge.grpcserver import ServiceBinding, start_grpc_server
from nudge.logs import setup_logging
from nudge.metrics import serve_metrics
from nudge.telemetry import setup_tracing
from services.dispatch.application import Dispatcher, Tracker, Unsubscriber
from services.dispatch.channels.base import Channel
from services.dispatch.channels.configured import provider_channels
from services.dispatch.channels.console import ConsoleChannel
from services.dispatch.channels.email import SmtpChannel
from services.dispatch.channels.instrumented import instrumented
from services.dispatch.channels.webhook import WebhookChannel
from services.dispatch.consumers import DURABLE, consume_send_requests
from services.dispatch.grpc_api import DispatchServicer
from services.dispatch.http_api import (
    PublicApp,
    start_http_server,
    tracking_config,
    tracking_secret,
    unsubscribe_links,
)
from services.dispatch.settings import Settings

log = logging.getLogger("nudge.dispatch")


async def main(stop: asyncio.Event) -> None:
    """Build → serve → drain."""
    settings = Settings.from_env()
    async with AsyncExitStack() as stack:
        pool = await db.create_pool(settings.database_url, max_size=10, application_name="dispatch")
        stack.push_async_callback(pool.close)
        nc = await bus.connect(settings.nats_url, "nudge-dispatch")
        stack.push_async_callback(nc.close)  # publishes are acked; nothing to drain
        js = nc.jetstream()
        names = bus.BusNames(settings.nats_prefix)
        await bus.ensure_streams(js, names)

        channels: dict[str, Channel] = {
            "email": SmtpChannel(settings.smtp_url, settings.email_from),
            "webhook": WebhookChannel(
                settings.webhook_secret, allow_private_hosts=settings.webhook_allow_hosts
            ),
            "console": ConsoleChannel(),
        }
        channels.update(provider_channels(settings))  # push, sms: only when their URL is set
        for channel in channels.values():
            stack.push_async_callback(channel.aclose)
        channels = instrumented(channels)
        clock = DbClock(pool)
        await clock.sync()
        links = unsubscribe_links(settings)
        dispatcher = Dispatcher(
            pool,
            channels,
            clock,
            lease=timedelta(seconds=settings.lease_s),
            retry_window=timedelta(seconds=settings.retry_window_s),
            channel_concurrency=settings.channel_concurrency,
            pickup_grace=timedelta(seconds=settings.pickup_grace_s),
            unsubscribe_links=links,
            tracking=tracking_config(settings),
        )
        stack.push_async_callback(dispatcher.drain)  # after the loops below stopped feeding it
        supervisor = runtime.Supervisor(stop)
        stack.push_async_callback(supervisor.aclose)
        supervisor.start("clock", clock.run())
        supervisor.start(
            "consumer", consume_send_requests(js, names, dispatcher, ack_wait_s=settings.ack_wait_s)
        )
        supervisor.start("sweeper", dispatcher.run_sweeper())

        server = await start_grpc_server(
            settings.address,
            [
                ServiceBinding(
                    dispatch_pb2_grpc.add_DispatchServiceServicer_to_server,
                    DispatchServicer(pool, KeyVerifier(pool)),
                    "nudge.dispatch.v1.DispatchService",
                )
            ],
        )
        public = PublicApp(Unsubscriber(pool, links), Tracker(pool, tracking_secret(settings)))
        http = await start_http_server(settings.http_address, public)
        stack.push_async_callback(http.wait_closed)
        stack.callback(http.close)
        readiness = health.Readiness(
            server,
            [
                health.database(pool),
                health.jetstream(nc, js, names.dispatch_stream),
                health.consumer(js, names.dispatch_stream, DURABLE),
            ],
        )
        supervisor.start("readiness", readiness.run())
        samplers = [metrics.consumer_sampler(js, names.dispatch_stream, DURABLE)]
        supervisor.start("metrics", metrics.run_samplers(samplers))
        log.info("dispatch serving on %s", settings.address)
        await stop.wait()
        log.info("dispatch draining")
        await server.drain()
    if supervisor.failure is not None:
        raise SystemExit(1)


if __name__ == "__main__":
    setup_logging("dispatch")
    setup_tracing("dispatch")
    serve_metrics("dispatch")
    runtime.run(main)
