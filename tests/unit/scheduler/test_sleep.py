"""The firing loop's sleep (nudge.runtime.sleep_or_wake) must stay cancellable."""

from __future__ import annotations

import asyncio

from nudge.runtime import sleep_or_wake


async def test_sleep_is_cancelled_even_when_woken_in_the_same_instant() -> None:
    async def sleep_forever(wake: asyncio.Event) -> None:
        while True:
            await sleep_or_wake(wake, 30.0)

    for _ in range(50):
        wake = asyncio.Event()
        task = asyncio.create_task(sleep_forever(wake))
        await asyncio.sleep(0)
        wake.set()  # a NOTIFY arrives ...
        task.cancel()  # ... as the service drains
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert done == {task}
        assert task.cancelled()


async def test_sleep_returns_on_wake_and_clears_it() -> None:
    wake = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, wake.set)

    await asyncio.wait_for(sleep_or_wake(wake, 30.0), timeout=5)

    assert not wake.is_set()


async def test_sleep_returns_after_the_timeout() -> None:
    await asyncio.wait_for(sleep_or_wake(asyncio.Event(), 0.01), timeout=5)
