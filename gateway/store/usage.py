# ruff: noqa: S608 - the f-strings only join this module's constant column lists and keys
"""The usage tables' SQL, for both backends (over the backend's ``_select``, ``_returning``
and ``_transaction``, as :mod:`gateway.store.writes` does).

- ``usage_periods``: per (customer, meter, period start) the units ``used`` (durable) and
  ``reserved`` (held by workers/replicas, not yet spent) and the period's ``quota``
  (-1: none). A reservation is one ``UPDATE … SET reserved = reserved + k WHERE used +
  reserved + k <= quota RETURNING`` inside a transaction holding the row's lock, so two
  replicas can never hand out the same unit.
- ``usage_reservations``: who holds what (``holder`` = one process), until when: a holder
  refreshes its reservations at each flush; a dead one's expire and are taken back by the next
  reservation of the same row.
- ``usage_windows``: the outbox of meter events, one row per (customer, meter, report window),
  its ``identifier`` deterministic; claimed by one sender at a time, marked sent after Stripe's
  answer.
- ``usage_reports``: the app's report ids (``POST /_gate/usage``), so a retried report counts
  once.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store.base import SQL, Row, Table, Tx

__all__ = [
    "USAGE_LOCK",
    "Delta",
    "PeriodKey",
    "PeriodRow",
    "UsageSQL",
    "Window",
    "window_identifier",
]

#: :meth:`~gateway.store.base.Tx.lock` space of a usage row ("use1").
USAGE_LOCK = 0x75736531


@dataclass(frozen=True, slots=True)
class PeriodKey:
    """One counter: a customer's units on a meter in one period (Unix seconds)."""

    customer_id: str
    meter: str
    period_start: float
    period_end: float

    @property
    def lock_key(self) -> str:
        return f"{self.customer_id}|{self.meter}|{self.period_start:.0f}"


@dataclass(frozen=True, slots=True)
class PeriodRow:
    customer_id: str
    meter: str
    period_start: float
    period_end: float
    quota: int | None
    used: int
    reserved: int


@dataclass(slots=True)
class Delta:
    """What one flush writes for one counter: ``spent`` units to add to ``used``, of which
    ``from_reserved`` came out of this holder's reservation, ``give_back`` unspent reserved
    units returned; ``keep`` True to refresh the reservation's expiry."""

    key: PeriodKey
    spent: int = 0
    from_reserved: int = 0
    give_back: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """One outbox row: the sum of a customer's units on a meter in one report window."""

    identifier: str
    customer_id: str
    meter: str
    window_start: float
    value: int
    first_at: float


def window_identifier(customer_id: str, meter: str, window_start: float) -> str:
    """The meter event's ``identifier``: the same for the same window, whoever sends it
    (Stripe rejects a second event with it for 24 hours)."""
    digest = hashlib.sha256(f"{customer_id}\x00{meter}".encode()).hexdigest()[:24]
    return f"gw_{int(window_start)}_{digest}"


PERIODS = Table("usage_periods", PeriodRow)
WINDOWS = Table("usage_windows", Window)


def _period(row: Row) -> PeriodRow:
    quota = int(row["quota"])  # -1: none
    return PERIODS.load(row, quota=None if quota < 0 else quota)


_KEY = "customer_id = $1 AND meter = $2 AND period_start = $3"
_ENSURE = (
    "INSERT INTO usage_periods (customer_id, meter, period_start, period_end, quota, used, "
    "reserved, updated_at) VALUES ($1, $2, $3, $4, $5, 0, 0, $6) "
    "ON CONFLICT (customer_id, meter, period_start) DO NOTHING"
)
_WINDOW_ADD = (
    "INSERT INTO usage_windows (identifier, customer_id, meter, window_start, value, first_at) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (identifier) DO UPDATE SET "
    "value = usage_windows.value + excluded.value "
    "WHERE usage_windows.sent_at IS NULL AND usage_windows.dropped IS NULL "
    "AND usage_windows.claimed_by IS NULL"
)


async def _reclaim(tx: Tx, key: PeriodKey, now: float) -> None:
    """Take back the expired reservations of ``key`` (their holder died)."""
    rows = await tx.fetch(
        f"DELETE FROM usage_reservations WHERE {_KEY} AND expires_at <= $4 RETURNING units",
        key.customer_id,
        key.meter,
        key.period_start,
        now,
    )
    lost = sum(int(r["units"]) for r in rows)
    if lost:
        await tx.execute(
            f"UPDATE usage_periods SET reserved = reserved - $4 WHERE {_KEY}",
            key.customer_id,
            key.meter,
            key.period_start,
            lost,
        )


async def add_to_window(
    tx: Tx, customer_id: str, meter: str, units: int, now: float, interval: float
) -> None:
    """Add ``units`` to the outbox row of the report window holding ``now``; to a later
    window's when that row is already being sent (or sent)."""
    start = now - now % interval
    for _ in range(8):
        changed = await tx.execute(
            _WINDOW_ADD,
            window_identifier(customer_id, meter, start),
            customer_id,
            meter,
            start,
            units,
            now,
        )
        if changed:
            return
        start += interval
    raise RuntimeError("no open report window")  # pragma: no cover - 8 windows claimed at once


class UsageSQL:
    """The usage queries on one backend (an opened :class:`~gateway.store.Backend`)."""

    def __init__(self, backend: SQL) -> None:
        self._db = backend

    async def reserve(
        self,
        holder: str,
        key: PeriodKey,
        quota: int,
        want: int,
        now: float,
        ttl: float,
    ) -> tuple[int, PeriodRow]:
        """Reserve up to ``want`` units of ``key`` under ``quota`` for ``holder`` (until
        ``now + ttl``): (units granted, the row after). Atomic across processes and replicas."""

        async def work(tx: Tx) -> tuple[int, PeriodRow]:
            args = (key.customer_id, key.meter, key.period_start)
            await tx.lock(USAGE_LOCK, key.lock_key)
            await tx.execute(_ENSURE, *args, key.period_end, quota, now)
            await _reclaim(tx, key, now)
            rows = await tx.fetch(PERIODS.select(_KEY), *args)
            row = _period(rows[0])
            grant = min(want, quota - row.used - row.reserved)
            if grant <= 0:
                if row.quota != quota:
                    await tx.execute(
                        f"UPDATE usage_periods SET quota = $4 WHERE {_KEY}",
                        *args,
                        quota,
                    )
                return 0, row
            updated = await tx.fetch(
                "UPDATE usage_periods SET reserved = reserved + $4, quota = $5, updated_at = $6 "
                f"WHERE {_KEY} AND used + reserved + $4 <= $5 "
                f"RETURNING {PERIODS.columns}",
                *args,
                grant,
                quota,
                now,
            )
            if not updated:  # cannot happen under the lock; refuse rather than overshoot
                return 0, row
            await tx.execute(
                "INSERT INTO usage_reservations (holder, customer_id, meter, period_start, "
                "units, expires_at) VALUES ($4, $1, $2, $3, $5, $6) "
                "ON CONFLICT (customer_id, meter, period_start, holder) DO UPDATE SET "
                "units = usage_reservations.units + excluded.units, "
                "expires_at = excluded.expires_at",
                *args,
                holder,
                grant,
                now + ttl,
            )
            return grant, _period(updated[0])

        result: tuple[int, PeriodRow] = await self._db._transaction("usage_reserve", work)
        return result

    async def flush(
        self,
        holder: str,
        deltas: Sequence[Delta],
        now: float,
        ttl: float,
        interval: float,
        quotas: dict[PeriodKey, int | None],
    ) -> dict[PeriodKey, PeriodRow]:
        """Make ``deltas`` durable in one transaction: ``used`` up by what was spent,
        ``reserved`` down by what came out of (or goes back from) this holder's reservation,
        the reservation's expiry refreshed, the spent units added to the report window. The
        rows after, by key."""

        async def work(tx: Tx) -> dict[PeriodKey, PeriodRow]:
            out: dict[PeriodKey, PeriodRow] = {}
            for d in deltas:
                key = d.key
                args = (key.customer_id, key.meter, key.period_start)
                quota = quotas.get(key)
                await tx.lock(USAGE_LOCK, key.lock_key)
                await tx.execute(
                    _ENSURE, *args, key.period_end, -1 if quota is None else quota, now
                )
                released = d.from_reserved + d.give_back
                rows = await tx.fetch(
                    "UPDATE usage_periods SET used = used + $4, reserved = reserved - $5, "
                    f"updated_at = $6 WHERE {_KEY} RETURNING {PERIODS.columns}",
                    *args,
                    d.spent,
                    released,
                    now,
                )
                out[key] = _period(rows[0])
                await tx.execute(
                    "UPDATE usage_reservations SET units = units - $5, expires_at = $6 "
                    f"WHERE {_KEY} AND holder = $4",
                    *args,
                    holder,
                    released,
                    now + ttl,
                )
                await tx.execute(
                    f"DELETE FROM usage_reservations WHERE {_KEY} AND holder = $4 AND units <= 0",
                    *args,
                    holder,
                )
                if d.spent:
                    await add_to_window(tx, key.customer_id, key.meter, d.spent, now, interval)
            # Whatever else this holder still holds stays alive.
            await tx.execute(
                "UPDATE usage_reservations SET expires_at = $2 WHERE holder = $1",
                holder,
                now + ttl,
            )
            return out

        result: dict[PeriodKey, PeriodRow] = await self._db._transaction("usage_flush", work)
        return result

    async def report(
        self,
        report_id: str,
        key: PeriodKey,
        value: int,
        now: float,
        interval: float,
    ) -> PeriodRow | None:
        """An app's report (``POST /_gate/usage``): ``value`` units added to ``key`` and its
        report window, once per ``report_id``; None if that id was counted already."""

        async def work(tx: Tx) -> PeriodRow | None:
            new = await tx.execute(
                "INSERT INTO usage_reports (report_id, customer_id, meter, value, at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (report_id) DO NOTHING",
                report_id,
                key.customer_id,
                key.meter,
                value,
                now,
            )
            if not new:
                return None
            args = (key.customer_id, key.meter, key.period_start)
            await tx.lock(USAGE_LOCK, key.lock_key)
            await tx.execute(_ENSURE, *args, key.period_end, -1, now)
            rows = await tx.fetch(
                f"UPDATE usage_periods SET used = used + $4, updated_at = $5 WHERE {_KEY} "
                f"RETURNING {PERIODS.columns}",
                *args,
                value,
                now,
            )
            if value:
                await add_to_window(tx, key.customer_id, key.meter, value, now, interval)
            return _period(rows[0])

        result: PeriodRow | None = await self._db._transaction("usage_report", work)
        return result

    async def periods_of(self, customer_id: str, at: float) -> list[PeriodRow]:
        """The customer's counters of periods not ended at ``at`` (the current one; one that
        starts a moment later by another clock's reading too), oldest first."""
        rows = await self._db._select(
            "usage_periods_of",
            PERIODS.select("customer_id = $1 AND period_end > $2 ORDER BY meter, period_start"),
            customer_id,
            at,
        )
        return [_period(r) for r in rows]

    async def claim_windows(
        self, holder: str, closed_before: float, now: float, lease: float, limit: int
    ) -> list[Window]:
        """Claim (for ``lease`` seconds) up to ``limit`` unsent outbox rows of windows that
        started before ``closed_before``, oldest first; a claim past its lease is taken over
        (its sender died)."""
        rows = await self._db._returning(
            "usage_claim",
            "UPDATE usage_windows SET claimed_by = $1, claimed_until = $2 WHERE identifier IN ("
            "SELECT identifier FROM usage_windows WHERE sent_at IS NULL AND dropped IS NULL "
            "AND window_start < $3 AND (claimed_by IS NULL OR claimed_until <= $4) "
            "ORDER BY window_start, identifier LIMIT $5) "
            "AND sent_at IS NULL AND (claimed_by IS NULL OR claimed_until <= $4) "
            f"RETURNING {WINDOWS.columns}",
            holder,
            now + lease,
            closed_before,
            now,
            limit,
        )
        windows = [WINDOWS.load(r) for r in rows]
        return sorted(windows, key=lambda w: (w.window_start, w.identifier))

    async def finish_window(
        self, holder: str, identifier: str, now: float, *, sent: bool, dropped: str | None = None
    ) -> None:
        """Mark a claimed row sent (or dropped, with why), or (neither) give the claim back."""
        if sent or dropped:
            sql = (
                "UPDATE usage_windows SET sent_at = $3, dropped = $4, claimed_until = NULL "
                "WHERE identifier = $1 AND claimed_by = $2"
            )
            await self._db._returning(
                "usage_finish", sql + " RETURNING identifier", identifier, holder, now, dropped
            )
            return
        await self._db._returning(
            "usage_release",
            "UPDATE usage_windows SET claimed_by = NULL, claimed_until = NULL "
            "WHERE identifier = $1 AND claimed_by = $2 RETURNING identifier",
            identifier,
            holder,
        )

    async def pending_windows(self) -> int:
        rows = await self._db._select(
            "usage_pending",
            "SELECT COUNT(*) AS n FROM usage_windows WHERE sent_at IS NULL AND dropped IS NULL",
        )
        return int(rows[0]["n"])

    async def window_totals(
        self, start: float, end: float, customer_id: str | None = None
    ) -> dict[tuple[str, str], tuple[int, int]]:
        """Per (customer, meter): (units counted, units sent to Stripe) in windows starting in
        [start, end)."""
        sql = (
            "SELECT customer_id, meter, SUM(value) AS total, "
            "SUM(CASE WHEN sent_at IS NOT NULL AND dropped IS NULL THEN value ELSE 0 END) AS sent "
            "FROM usage_windows WHERE window_start >= $1 AND window_start < $2"
        )
        args: list[Any] = [start, end]
        if customer_id is not None:
            sql += " AND customer_id = $3"
            args.append(customer_id)
        rows = await self._db._select(
            "usage_totals", sql + " GROUP BY customer_id, meter ORDER BY 1, 2", *args
        )
        return {(r["customer_id"], r["meter"]): (int(r["total"]), int(r["sent"])) for r in rows}
