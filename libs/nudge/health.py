"""Readiness: grpc.health.v1 reports SERVING only while the service can do its work.

A service is ready when its database answers and has every migration applied, its NATS
connection is up and JetStream answers, and its durable consumers exist. `Readiness.run` checks
all of that at start-up (every 0.2 s until ready, so start-up is not slowed) and then every
``NUDGE_READINESS_INTERVAL_S`` (default 2 s), and flips the health status both ways: a lost
database or NATS turns the service NOT_SERVING within about one interval plus the check timeout,
and SERVING again once they are back. On SIGTERM `GrpcServer.drain` turns it NOT_SERVING for
good before the server stops (grpc_health's graceful-shutdown mode ignores later updates).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from nudge import metrics
from nudge.config import ConfigError, env_float
from nudge.db import Queryable
from nudge.migrate import is_migrated

log = logging.getLogger("nudge.health")

STARTING_INTERVAL_S = 0.2


class NotReadyError(Exception):
    """A readiness check failed; the message says why (no secrets, no user data)."""


@dataclass(frozen=True)
class Check:
    """A named probe that returns when the dependency is usable and raises when not."""

    name: str
    probe: Callable[[], Awaitable[None]]


def database(pool: Queryable) -> Check:
    """The database answers and every shipped migration is applied."""

    async def probe() -> None:
        if not await is_migrated(pool):
            raise NotReadyError("schema not migrated (run `nudge migrate`)")

    return Check("database", probe)


def jetstream(nc: NatsClient, js: JetStreamContext, stream: str) -> Check:
    """The NATS connection is up and JetStream serves `stream`."""

    async def probe() -> None:
        if not nc.is_connected:
            raise NotReadyError("NATS disconnected")
        await js.stream_info(stream)

    return Check("nats", probe)


def consumer(js: JetStreamContext, stream: str, durable: str) -> Check:
    """The durable consumer `durable` exists on `stream` (our consumer loop created it)."""

    async def probe() -> None:
        await js.consumer_info(stream, durable)

    return Check(f"consumer:{durable}", probe)


def interval_from_env() -> float:
    """``$NUDGE_READINESS_INTERVAL_S`` (default 2)."""
    interval = env_float("NUDGE_READINESS_INTERVAL_S", 2.0, os.environ)
    if not interval > 0:
        raise ConfigError("NUDGE_READINESS_INTERVAL_S", f"must be positive, got {interval}")
    return interval


class Serving(Protocol):
    """What Readiness drives (`nudge.grpcserver.GrpcServer`)."""

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING (True) or NOT_SERVING."""


class Readiness:
    """Keeps a server's health status equal to the outcome of its checks."""

    def __init__(
        self,
        server: Serving,
        checks: Sequence[Check],
        *,
        interval_s: float | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        self._server = server
        self._checks = list(checks)
        self._interval_s = interval_from_env() if interval_s is None else interval_s
        self._timeout_s = timeout_s
        self.ready: bool | None = None
        self.failures: dict[str, str] = {}
        self._ever_ready = False

    async def check_once(self) -> bool:
        """Run every check (concurrently), publish the result, return whether all passed."""
        results = await asyncio.gather(*(self._run(check) for check in self._checks))
        failures = {name: why for name, why in results if why is not None}
        ready = not failures
        for check in self._checks:
            metrics.READY_CHECK.labels(check.name).set(0 if check.name in failures else 1)
        metrics.READY.set(1 if ready else 0)
        if ready != self.ready or failures.keys() != self.failures.keys():
            if ready:
                log.info("ready: SERVING")
            elif self.ready is not None or self.failures:
                log.warning("not ready: NOT_SERVING (%s)", _describe(failures))
        self.failures = failures
        if ready != self.ready:
            await self._server.set_serving(ready)
            self.ready = ready
        return ready

    async def run(self) -> None:
        """Check forever: quickly until first ready, then every interval."""
        while True:
            self._ever_ready = await self.check_once() or self._ever_ready
            await asyncio.sleep(self._interval_s if self._ever_ready else STARTING_INTERVAL_S)

    async def _run(self, check: Check) -> tuple[str, str | None]:
        try:
            async with asyncio.timeout(self._timeout_s):
                await check.probe()
        except TimeoutError:
            return check.name, f"no answer within {self._timeout_s:g}s"
        except Exception as error:
            return check.name, str(error) or type(error).__name__
        return check.name, None


def _describe(failures: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))
