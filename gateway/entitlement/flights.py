"""Singleflight: concurrent callers of one key share one task, owned here.

The shared task is shielded, so a cancelled caller does not cancel the others, and
:meth:`Flights.close` cancels and awaits what is still in flight."""

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from gateway.entitlement.base import EntitlementStats
from gateway.logs import log_event
from gateway.stripe_api import StripeError

T = TypeVar("T")

log = logging.getLogger("gateway.entitlement")


class Flights:
    """In-flight lookups by key (``who:…``, ``cus:…``, ``mail:…``)."""

    def __init__(self, stats: EntitlementStats) -> None:
        self._stats = stats
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.closed = False

    async def run(self, key: str, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``factory()``'s result, shared with every concurrent caller of ``key``."""
        if self.closed:  # shutting down: no new owned tasks, just do the work
            return await factory()
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(factory(), name=f"entitlement {key}")
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        else:
            self._stats.coalesced += 1
        # shield: one cancelled caller must not cancel the shared task for everyone else.
        return cast(T, await asyncio.shield(task))

    def _done(self, key: str, task: "asyncio.Task[Any]") -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, StripeError):
            log_event(log, "lookup_failed", level=logging.ERROR, key=key, error=repr(exc))

    def close(self) -> list["asyncio.Task[Any]"]:
        """Refuse new owned tasks; cancel the running ones and hand them back to be awaited."""
        self.closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        return tasks
