"""The process's usage counters: admission against a quota from a reservation held in memory,
and the flush that makes counted units durable.

A counter is one (customer, meter, period). Its hot path is memory only: a unit is admitted
out of ``held`` (units this process reserved from the store), counted in ``spent``. When
``held`` runs low (under half the last block, far from the quota) the next block is reserved in
the background, so a busy counter's requests do not wait on the store; when it is empty the
next request reserves a block from the store
(:meth:`gateway.store.usage.UsageSQL.reserve`: atomic across workers and replicas), a block
that shrinks near the quota (a tenth of what is left, at most :data:`MAX_BLOCK`; one unit for
the last ten) so that no process sits on units another needs. Unspent units go back at the
first flush after a quiet interval; a request that finds the quota reserved by others (but
not used) waits for them, up to :data:`WAIT_FOR_RETURNS` flush intervals, before it is
refused — so exactly the quota is admitted, never more.

Every ``USAGE_FLUSH_INTERVAL`` (and at shutdown) :meth:`Counters.flush` writes what was spent
(``used``), returns what is given back, refreshes this process's reservations (a process that
dies stops refreshing: its reservations expire after :data:`reservation_ttl` and the next
reservation of that counter takes them back) and adds the units to the outbox
(:mod:`gateway.usage.reporter`). A crash loses at most the units counted since the last flush:
they were served, and are neither billed nor counted against the quota.

Without a quota, or with a metered price on the meter (overage), units are only counted.
"""

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field

from gateway.logs import log_event
from gateway.model import Clock
from gateway.store.base import StoreError
from gateway.store.usage import Delta, PeriodKey, PeriodRow, UsageSQL

__all__ = [
    "MAX_BLOCK",
    "PREFETCH_MIN",
    "WAIT_FOR_RETURNS",
    "Admission",
    "Counter",
    "Counters",
    "reservation_ttl",
]

log = logging.getLogger("gateway.usage")

#: The most units one reservation takes (a tenth of what is left, so far from the quota a
#: busy worker asks the store about once per thousand requests).
MAX_BLOCK = 1000
#: The smallest block reserved ahead in the background (nearer the quota, blocks are smaller
#: and a process must not sit on units another needs: it reserves only when it has none).
PREFETCH_MIN = 100
#: How many flush intervals a request waits for other processes to return their unspent units
#: before it is refused.
WAIT_FOR_RETURNS = 3


def reservation_ttl(flush_interval: float) -> float:
    """How long a reservation lives without being refreshed: a dead process's units come back
    after at most this (10 s, or 5 flush intervals if longer)."""
    return max(10.0, 5 * flush_interval)


@dataclass(frozen=True, slots=True)
class Admission:
    """What admitting one unit found: allowed or not, and the counter's state for display."""

    allowed: bool
    used: int
    quota: int | None


@dataclass(slots=True, eq=False)
class Counter:
    key: PeriodKey
    quota: int | None
    overage: bool
    held: int = 0  # reserved in the store for this process, not yet spent
    spent_reserved: int = 0  # spent out of ``held`` since the last flush
    spent_free: int = 0  # spent without a reservation (no quota, overage, app reports)
    seen_used: int = 0  # the store's ``used`` at the last read
    seen_reserved: int = 0  # the store's ``reserved`` at the last read
    inflight: int = 0  # being flushed right now (display only)
    returning: int = 0  # held under a higher quota (a downgrade): given back at the next flush
    busy: bool = False  # admitted something since the last flush
    block: int = 0  # the last block reserved (the low-water mark for reserving ahead is half)
    refilling: bool = False  # a reservation ahead is in flight
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def used(self) -> int:
        """Units used as this process knows it (the store's, plus its own unflushed), for
        display. Admission never counts ``inflight`` (a row read while a flush commits may
        include it already): it may only under-estimate, then ask the store."""
        return self.seen_used + self.inflight + self.spent_reserved + self.spent_free

    def seen(self, row: PeriodRow) -> None:
        self.seen_used = row.used
        self.seen_reserved = row.reserved


class Counters:
    """This process's counters on one store (see the module docstring)."""

    def __init__(
        self, sql: UsageSQL, clock: Clock, flush_interval: float, report_interval: float
    ) -> None:
        self._sql = sql
        self._clock = clock
        self._flush_interval = flush_interval
        self._report_interval = report_interval
        self._ttl = reservation_ttl(flush_interval)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._counters: dict[PeriodKey, Counter] = {}
        self._flushing = asyncio.Lock()
        self._ahead: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._counters)

    def counter(self, key: PeriodKey, quota: int | None, overage: bool) -> Counter:
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = Counter(key, quota, overage)
        else:
            if c.held and quota is not None and (c.quota is None or quota < c.quota):
                # A lower quota (a downgrade mid-period): what was reserved under the old one
                # is never spent, it goes back to the store; admission asks under the new one.
                c.returning += c.held
                c.held = 0
            c.quota, c.overage = quota, overage  # a plan change mid-period keeps the count
        return c

    def peek(self, key: PeriodKey) -> Counter | None:
        return self._counters.get(key)

    def admit_now(self, c: Counter) -> Admission | None:
        """Admit one unit on ``c`` from memory (no quota, overage, or a unit held), or None:
        the store must be asked (:meth:`admit`). The hot path: no coroutine."""
        c.busy = True
        quota = c.quota
        if quota is None or c.overage:
            c.spent_free += 1
            return Admission(True, c.used, quota)
        if c.held > 0:
            c.held -= 1
            c.spent_reserved += 1
            if c.held * 2 < c.block and c.block >= PREFETCH_MIN and not c.refilling:
                self._reserve_ahead(c, quota)
            return Admission(True, c.used, quota)
        return None

    def _reserve_ahead(self, c: Counter, quota: int) -> None:
        c.refilling = True
        task = asyncio.get_running_loop().create_task(self._ahead_of(c, quota))
        self._ahead.add(task)
        task.add_done_callback(self._ahead.discard)

    async def _ahead_of(self, c: Counter, quota: int) -> None:
        """Reserve the next block before ``held`` is empty (far from the quota only)."""
        try:
            async with c.lock:
                left = quota - c.seen_used - c.seen_reserved
                want = min(MAX_BLOCK, left // 10)
                if want < PREFETCH_MIN or c.quota != quota or c.overage:
                    c.block = 0  # near the quota now: reserve only when none is held
                    return
                granted, row = await self._sql.reserve(
                    self.holder, c.key, quota, want, self._clock.time(), self._ttl
                )
                c.seen(row)
                if c.quota == quota and not c.overage:
                    c.held += granted
                    c.block = granted
                else:  # a downgrade meanwhile: reserved under the old quota, never spent
                    c.returning += granted
        except StoreError as exc:  # the request that finds none held asks again
            log_event(log, "usage_reserve_ahead_failed", level=logging.WARNING, error=str(exc))
        finally:
            c.refilling = False

    async def settle(self) -> None:
        """Wait for the reservations ahead in flight (before the final flush gives back all)."""
        while self._ahead:
            tasks = list(self._ahead)
            self._ahead.clear()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def admit(self, c: Counter) -> Admission:
        """Admit one unit on ``c`` (a store reservation when none is held), or refuse it."""
        got = self.admit_now(c)
        if got is not None:
            return got
        assert c.quota is not None  # admit_now admits every unit without a quota
        return await self._reserve_and_admit(c, c.quota)

    async def _reserve_and_admit(self, c: Counter, quota: int) -> Admission:
        deadline = self._clock.time() + WAIT_FOR_RETURNS * self._flush_interval + 1.0
        while True:
            async with c.lock:
                if c.held > 0:  # another request of this process reserved meanwhile
                    c.held -= 1
                    c.spent_reserved += 1
                    return Admission(True, c.used, quota)
                if c.seen_used + c.spent_reserved + c.spent_free >= quota:
                    return Admission(False, c.used, quota)  # used never shrinks in a period
                left = quota - c.seen_used - c.seen_reserved
                want = max(1, min(MAX_BLOCK, left // 10))
                granted, row = await self._sql.reserve(
                    self.holder, c.key, quota, want, self._clock.time(), self._ttl
                )
                c.seen(row)
                if granted > 0:
                    c.block = granted
                    c.held += granted - 1
                    c.spent_reserved += 1
                    return Admission(True, c.used, quota)
                if row.used + c.spent_reserved + c.spent_free >= quota:
                    return Admission(False, c.used, quota)
            # Others hold the rest, unspent: they give it back at their next quiet flush.
            if self._clock.time() >= deadline:
                return Admission(False, c.used, quota)
            await asyncio.sleep(self._flush_interval / 4)

    def add(self, key: PeriodKey, quota: int | None, overage: bool, units: int) -> Counter:
        """Count ``units`` the app reported for a request (``X-Gate-Usage``): the work is
        done, so they are counted whatever the quota says."""
        c = self.counter(key, quota, overage)
        c.spent_free += units
        c.busy = True
        return c

    async def flush(self, *, final: bool = False) -> None:
        """Write what was spent, give back what quiet counters hold (``final``: everything),
        refresh this process's reservations. On a store failure the units stay pending for
        the next flush."""
        async with self._flushing:
            deltas: list[Delta] = []
            touched: list[tuple[Counter, Delta]] = []
            quotas: dict[PeriodKey, int | None] = {}
            for c in self._counters.values():
                held = c.held if (final or not c.busy) and c.held else 0
                give = held + c.returning
                if not (c.spent_reserved or c.spent_free or give):
                    continue
                d = Delta(
                    c.key,
                    spent=c.spent_reserved + c.spent_free,
                    from_reserved=c.spent_reserved,
                    give_back=give,
                )
                c.spent_reserved = c.spent_free = 0
                c.inflight += d.spent
                c.held -= held
                c.returning = 0
                deltas.append(d)
                touched.append((c, d))
                quotas[c.key] = c.quota
            now = self._clock.time()
            for c in self._counters.values():
                c.busy = False
            if not deltas and not self._counters:
                return
            try:
                rows = await self._sql.flush(
                    self.holder, deltas, now, self._ttl, self._report_interval, quotas
                )
            except StoreError as exc:
                for c, d in touched:  # pending again: the next flush retries
                    c.inflight -= d.spent
                    c.spent_reserved += d.from_reserved
                    c.spent_free += d.spent - d.from_reserved
                    c.returning += d.give_back  # never spent again: given back next time
                log_event(
                    log,
                    "usage_flush_failed",
                    level=logging.WARNING,
                    error=str(exc),
                    rows=len(deltas),
                )
                if final:
                    raise
                return
            for c, d in touched:
                c.inflight -= d.spent
                row = rows.get(d.key)
                if row is not None:
                    c.seen(row)
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        """Counters of ended periods with nothing pending or held are dropped."""
        for key, c in list(self._counters.items()):
            if key.period_end <= now and not (
                c.held or c.returning or c.spent_free or c.spent_reserved
            ):
                del self._counters[key]
