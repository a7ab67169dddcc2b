"""The usage service of one process: what a request counts on, against which quota, in which
period; the app's own reports; the background flush and reporter.

Flow of a metered request (after the gate allowed it): :meth:`Usage.on_request` finds its
meter (``USAGE_RULES``), the customer's period (the subscription item's
``current_period_start``/``end``; a calendar month, UTC, without one), the quota
(``PRICE_QUOTAS`` of the price, ``FREE_QUOTAS`` for a customer without a subscription) and
whether a metered price covers the meter (overage), and admits one unit
(:class:`gateway.usage.counters.Counters`) — or refuses it (:class:`QuotaExceeded`).
"""

import asyncio
import contextlib
import logging
import re
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from multidict import CIMultiDict

from gateway.decision import RETRY_AFTER
from gateway.logs import log_event
from gateway.model import Clock, Denial, Entitlement, Pass
from gateway.paths import normalize_path
from gateway.settings import Settings
from gateway.store.base import StoreError
from gateway.store.usage import PeriodKey, UsageSQL
from gateway.stripe_api import StripeAPI, StripeError
from gateway.usage.config import UsageConfig
from gateway.usage.counters import Counter, Counters
from gateway.usage.reporter import Reporter

__all__ = ["MAX_UNITS", "QUOTA_HEADER", "MeterUsage", "QuotaExceeded", "Usage", "month_of"]

log = logging.getLogger("gateway.usage")

#: What the upstream is told of the request's meter: ``METER=USED/LIMIT`` (``USED`` alone
#: without a quota).
QUOTA_HEADER = "X-Gate-Quota"
#: How often the meters' Stripe ids are read again when an unknown one shows up.
_METER_IDS_REFRESH = 300.0
#: The most units one report may count (the app's header, ``POST /_gate/usage``): far below
#: a 64-bit column and Python's int-from-string limit.
MAX_UNITS = 10**12
#: ASCII digits only (``str.isdigit`` takes ``²``, which ``int`` refuses), at most 13 of them.
_UNITS = re.compile(r"[0-9]{1,13}")
_MEMO = 4096


def month_of(at: float) -> tuple[float, float]:
    """The calendar month (UTC) holding ``at``: (start, end) in Unix seconds."""
    day = datetime.fromtimestamp(at, UTC)
    start = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start.timestamp(), end.timestamp()


@dataclass(frozen=True, slots=True)
class QuotaExceeded:
    """A metered request past its quota (no metered price on the meter): what the answer
    says."""

    meter: str
    limit: int
    used: int
    resets_at: datetime
    free: bool  # a free quota (FREE_QUOTAS): the way on is to subscribe


@dataclass(frozen=True, slots=True)
class MeterUsage:
    """One meter of a customer, for the account page, ``api/me``, the badge and the CLI."""

    meter: str
    used: int
    limit: int | None
    period_start: datetime
    resets_at: datetime
    overage: bool


class Usage:
    """See the module docstring. Built by the services; :meth:`start` / :meth:`close` run
    the flush and the reporter."""

    def __init__(self, settings: Settings, sql: UsageSQL, stripe: StripeAPI, clock: Clock) -> None:
        self.settings = settings
        self.config: UsageConfig = settings.usage
        self.sql = sql
        self.clock = clock
        self.stripe = stripe
        self.counters = Counters(
            sql, clock, settings.usage_flush_interval, settings.meter_report_interval
        )
        self.reporter = Reporter(self)
        self._meter_ids: dict[str, str] = {}  # event_name → mtr_…
        self._meter_ids_read = float("-inf")
        self._meter_ids_asked: frozenset[str] = frozenset()
        self._memo: dict[str, Mapping[str, str] | None] = {}
        #: (customer, meter) → (the entitlement object, its counter, free?) of the last request
        self._hot: dict[tuple[str, str], tuple[Entitlement, Counter, bool]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        for price, meter in self.config.unlimited(settings.stripe_price_ids):
            log_event(
                log,
                "usage_price_unlimited",
                level=logging.WARNING,
                setting="PRICE_QUOTAS",
                price=price,
                meter=meter,
                hint="this sold price has no quota on a meter other prices limit",
            )

    # ---------------------------------------------------------------- what a request counts

    def meter_for(self, method: str, raw_path: str) -> str | None:
        """The meter of a request (``raw_path`` as sent, query included), or None."""
        target = raw_path.partition("?")[0]
        by_method = self._memo.get(target, _MISSING)
        if by_method is _MISSING:
            path = normalize_path(target)
            by_method = None if path is None else self.config.rules.match(path, target)
            if len(self._memo) >= _MEMO:
                self._memo.clear()
            self._memo[target] = by_method
        if by_method is None:
            return None
        # HEAD runs the app's GET handler (aiohttp, Flask, Express, Rails): a GET rule counts it.
        return (
            by_method.get(method)
            or (by_method.get("GET") if method == "HEAD" else None)
            or by_method.get("*")
        )

    def period_of(self, ent: Entitlement | None, now: float) -> tuple[float, float]:
        """The billing period of a subscriber (their item's current period; a clock a little
        behind Stripe's still counts in it), else the calendar month. Past the period's end
        before the renewal is read, the next period (as long as this one)."""
        if (
            ent is None
            or not ent.subscription_id
            or ent.period_start is None
            or ent.period_end is None
        ):
            return month_of(now)
        start, end = ent.period_start.timestamp(), ent.period_end.timestamp()
        length = end - start
        if length <= 0:
            return month_of(now)
        while now >= end:  # renewal due, not seen yet
            start, end = end, end + length
        return start, end

    def quota_of(self, ent: Entitlement | None, meter: str) -> tuple[int | None, bool]:
        """(units included, free?) for the entitlement on ``meter``."""
        if ent is None or not ent.subscription_id:
            return self.config.free_quotas.get(meter), True
        if ent.source == "grant":
            return None, False
        return self.config.quota(ent.price_id, meter), False

    def overage(self, ent: Entitlement | None, meter: str) -> bool:
        """Whether a metered price of the customer's subscription bills ``meter``."""
        if ent is None or not ent.meters:
            return False
        meter_id = self._meter_ids.get(meter)
        if meter_id is None:
            # A metered price on a meter not read yet: read the meters again (at once for a
            # new meter id, else at most once per interval).
            unknown = ent.meters - self._meter_ids_asked
            now = self.clock.time()
            if unknown or now - self._meter_ids_read > _METER_IDS_REFRESH:
                self._meter_ids_asked |= ent.meters
                self._meter_ids_read = now
                self._spawn(self._read_meter_ids())
        return meter_id is not None and meter_id in ent.meters

    def key_for(self, ent: Entitlement, meter: str) -> PeriodKey:
        start, end = self.period_of(ent, self.clock.time())
        return PeriodKey(ent.customer_id, meter, start, end)

    async def on_request(
        self, method: str, raw_path: str, verdict: Pass
    ) -> Pass | QuotaExceeded | Denial:
        """Count an allowed request on its meter (if any): the verdict with ``X-Gate-Quota``
        added, :class:`QuotaExceeded`, or (the store cannot reserve) ``unavailable``."""
        meter = self.meter_for(method, raw_path)
        ent = verdict.entitlement
        if meter is None or ent is None:
            return verdict
        # A paying user's requests carry the same entitlement object (the remembered
        # verdict's): its counter is found without working out the period again.
        hot = self._hot.get((ent.customer_id, meter))
        if hot is not None and hot[0] is ent and self.clock.time() < hot[1].key.period_end:
            c, free = hot[1], hot[2]
            if ent.meters and not c.overage:  # the meters' ids may have been read since
                c.overage = self.overage(ent, meter)
        else:
            quota, free = self.quota_of(ent, meter)
            key = self.key_for(ent, meter)
            c = self.counters.counter(key, quota, self.overage(ent, meter))
            if len(self._hot) >= _MEMO:
                self._hot.clear()
            self._hot[(ent.customer_id, meter)] = (ent, c, free)
        quota, key = c.quota, c.key
        try:
            got = self.counters.admit_now(c) or await self.counters.admit(c)
        except StoreError as exc:
            # The store cannot reserve: 503 (never admit past a quota that cannot be checked).
            log_event(log, "usage_reserve_failed", level=logging.WARNING, error=str(exc))
            return _UNAVAILABLE
        if not got.allowed:
            return QuotaExceeded(meter, got.quota or 0, got.used, _dt(key.period_end), free)
        shown = (
            f"{meter}={got.used}/{got.quota}" if got.quota is not None else f"{meter}={got.used}"
        )
        headers = CIMultiDict(verdict.headers)
        headers[QUOTA_HEADER] = shown
        return Pass(headers, entitlement=ent, features=verdict.features)

    def on_response(self, ent: Entitlement | None, values: list[str]) -> None:
        """The app's ``X-Gate-Usage: METER=N[,METER=N]`` of a response: known meters and
        whole numbers ≥ 0 counted for the request's customer; anything else logged."""
        if ent is None:
            if values:
                log_event(log, "usage_header_ignored", level=logging.WARNING, reason="no customer")
            return
        for value in values:
            for item in value.split(","):
                meter, sep, number = item.strip().partition("=")
                meter, number = meter.strip(), number.strip()
                if (
                    not sep
                    or meter not in self.config.meters
                    or not _UNITS.fullmatch(number)
                    or int(number) > MAX_UNITS
                ):
                    log_event(
                        log,
                        "usage_header_refused",
                        level=logging.WARNING,
                        item=item.strip()[:100],
                        reason=f"expected a known METER=N (N a whole number, 0 to {MAX_UNITS})",
                    )
                    continue
                units = int(number)
                if units:
                    quota, _ = self.quota_of(ent, meter)
                    self.counters.add(
                        self.key_for(ent, meter), quota, self.overage(ent, meter), units
                    )

    async def report(self, ent: Entitlement, meter: str, value: int, report_id: str) -> bool:
        """An app's report (``POST /_gate/usage``), durable when this returns; False if the
        id was counted before."""
        key = self.key_for(ent, meter)
        row = await self.sql.report(
            report_id, key, value, self.clock.time(), self.settings.meter_report_interval
        )
        if row is None:
            return False
        c = self.counters.peek(key)
        if c is not None:
            c.seen(row)
        return True

    async def usage_of(self, ent: Entitlement | None) -> list[MeterUsage]:
        """Every quota'd or counted meter of the customer in the current period."""
        if ent is None:
            return []
        now = self.clock.time()
        stored = await self.sql.periods_of(ent.customer_id, now)
        rows = {(r.meter, r.period_start): r for r in stored}
        meters = sorted(
            {m for m in self.config.meters if self.quota_of(ent, m)[0] is not None}
            | {r.meter for r in stored}
        )
        out = []
        for meter in meters:
            key = self.key_for(ent, meter)
            row = rows.get((meter, key.period_start))
            c = self.counters.peek(key)
            used = row.used if row is not None else 0
            if c is not None:
                used = max(used, c.used)
            out.append(
                MeterUsage(
                    meter=meter,
                    used=used,
                    limit=self.quota_of(ent, meter)[0],
                    period_start=_dt(key.period_start),
                    resets_at=_dt(key.period_end),
                    overage=self.overage(ent, meter),
                )
            )
        return out

    # ---------------------------------------------------------------- background

    async def start(self) -> None:
        await self._read_meter_ids()
        self._tasks.append(asyncio.create_task(self._flush_loop()))
        self._tasks.append(asyncio.create_task(self.reporter.run()))

    async def close(self) -> None:
        """Stop the loops, then the final flush: nothing counted is lost on shutdown."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.counters.settle()
        try:
            await self.counters.flush(final=True)
        except StoreError as exc:
            log_event(log, "usage_final_flush_failed", level=logging.ERROR, error=str(exc))

    async def _flush_loop(self) -> None:
        interval = self.settings.usage_flush_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.counters.flush()
            except Exception as exc:  # a bug must not stop durability: log, keep flushing
                log_event(log, "usage_flush_error", level=logging.ERROR, error=repr(exc))

    async def _read_meter_ids(self) -> None:
        if not self.settings.billing_enabled or not self.config:
            return
        try:
            meters = await self.stripe.list_meters()
        except StripeError as exc:
            log_event(log, "usage_meters_unavailable", level=logging.WARNING, error=str(exc))
            return
        self._meter_ids_read = self.clock.time()
        for m in meters:
            name, meter_id = m.get("event_name"), m.get("id")
            if isinstance(name, str) and isinstance(meter_id, str):
                self._meter_ids[name] = meter_id

    async def refresh_meter_ids(self) -> None:
        """Read the meters' Stripe ids now (the CLI)."""
        await self._read_meter_ids()

    def meter_id(self, meter: str) -> str | None:
        return self._meter_ids.get(meter)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)


_MISSING: Mapping[str, str] = {}
_UNAVAILABLE = Denial("unavailable", 503, "billing_unavailable", retry_after=RETRY_AFTER)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
