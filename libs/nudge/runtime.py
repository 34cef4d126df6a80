"""The lifecycle every service shares: build → serve → drain, stopped by SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("nudge.runtime")


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` in a new event loop; SIGTERM/SIGINT set `stop` for a graceful drain."""

    # `kill -USR1 <pid>` prints every thread's stack: the first tool for a hung service.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)
        await main(stop)

    asyncio.run(runner())


def _dump_tasks() -> None:
    """`kill -USR2 <pid>` prints every asyncio task's stack (where a hung drain waits)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


class Supervisor:
    """Background loops of a service. A crashed loop stops the service (fail fast, restart)."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._tasks: list[asyncio.Task[None]] = []
        self.failure: BaseException | None = None

    def start(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` until it returns or the service drains."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_done)
        self._tasks.append(task)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("background loop %s crashed: %r", task.get_name(), error, exc_info=error)
            self.failure = error
            self._stop.set()

    async def aclose(self) -> None:
        """Cancel every loop and wait for them."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def sleep_or_wake(wake: asyncio.Event, timeout_s: float) -> None:
    """Wait until `wake` is set or `timeout_s` passes, then clear `wake`."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
    # arrives together with `wake` being set, so the task would ignore Supervisor.aclose().
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(timeout_s, 0.0)):
            await wake.wait()
    wake.clear()
