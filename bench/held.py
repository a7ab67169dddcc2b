"""Connections held open in bulk, and the memory a server spends on them (bench/ws_capacity.py
for the gate, bench/nginx_memory.py for an nginx worker): :func:`open_many` opens them a bounded
number at a time, :class:`Held` is a memory reading before and with them open, and
:func:`raise_nofile` lets this process hold both ends of that many connections."""

import asyncio
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Held", "open_many", "raise_nofile"]

T = TypeVar("T")


async def open_many(count: int, open_one: Callable[[int], Awaitable[T]], at_once: int) -> list[T]:
    """``open_one(i)`` for every ``i < count``, ``at_once`` at a time; what they opened."""
    sem = asyncio.Semaphore(at_once)

    async def one(i: int) -> T:
        async with sem:
            return await open_one(i)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


@dataclass(frozen=True)
class Held:
    """A memory reading (KiB) before and with ``count`` connections open."""

    count: int
    before: int
    loaded: int

    @property
    def per_conn(self) -> float:
        """KiB per connection."""
        return (self.loaded - self.before) / self.count


def raise_nofile(needed: int | None = None) -> None:
    """Raise this process's open-file soft limit to ``needed`` (None: as far as it goes), at
    most to the hard limit (raising that needs CAP_SYS_RESOURCE, which these machines do not
    give even to root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if needed is not None and (hard == resource.RLIM_INFINITY or needed < hard):
        target = needed
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
