"""An asyncio loop in a daemon thread, for tests that drive an agent from the test's thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class LoopThread:
    """Runs coroutines on its own event loop from any thread (``run`` waits, 60 s at most)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="memd-agent", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


class _Closable(Protocol):
    def close(self) -> None: ...


def shut_down(loop: LoopThread, apps: Iterable[_Stoppable], stores: Iterable[_Closable]) -> None:
    """Stop the agents on their loop, then the loop, then close the agents' stores (an agent
    uses its store until it has stopped)."""
    for app in apps:
        loop.run(app.stop())
    loop.close()
    for store in stores:
        store.close()
