"""The outbox's sender: the store's per-window sums to Stripe as meter events.

Each ``usage_windows`` row is one (customer, meter, ``METER_REPORT_INTERVAL`` window) with the
sum of its units; it becomes one ``POST /v1/billing/meter_events`` with the row's
deterministic ``identifier`` and a ``timestamp`` inside the window (the first unit's flush), so
a retry of a row Stripe already has is rejected as a duplicate (Stripe keeps identifiers 24 h),
which counts as sent. A row is claimed in the store before it is sent (one worker or replica
sends it; a claim whose sender died expires after :data:`CLAIM_LEASE`), and marked sent only
after Stripe's answer. A window is sent once it is closed: its end plus a grace that covers a
flush in flight.

Stripe down (breaker open, 5xx, timeouts): the round stops and the rows wait, oldest first,
while counting and enforcement go on. A row whose window is older than Stripe accepts
(:data:`STRIPE_PAST_LIMIT`, 35 days) is dropped, logged and counted in the
``gate_usage_reports_total{outcome="dropped"}`` metric; any other refusal is logged and
retried when its claim ends (once a minute). Calls go through the one Stripe client (its
breaker and rate limiter): at most one per row, so one per active (customer, meter) per
window.
"""

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING

from gateway.logs import log_event
from gateway.store.base import StoreError
from gateway.store.usage import Window
from gateway.stripe_api import (
    StripeDuplicateMeterEvent,
    StripeError,
    StripeRejected,
)

if TYPE_CHECKING:
    from gateway.usage.service import Usage

__all__ = ["CLAIM_LEASE", "OUTCOMES", "STRIPE_PAST_LIMIT", "Reporter"]

log = logging.getLogger("gateway.usage")

#: Stripe accepts meter events up to 35 days old; a little less, to be sure of it.
STRIPE_PAST_LIMIT = 35 * 86400 - 3600
#: How long a claimed row stays a sender's before another may take it over.
CLAIM_LEASE = 60.0
#: What happens to an outbox row: Stripe took it (or had it), refused it (kept), was
#: unavailable (kept), or it was older than Stripe accepts.
OUTCOMES = ("sent", "refused", "deferred", "dropped")
#: Rows per round.
_BATCH = 100


class Reporter:
    """Sends closed windows (see the module docstring)."""

    def __init__(self, usage: "Usage") -> None:
        self._usage = usage
        self._interval = usage.settings.meter_report_interval
        self._grace = max(5.0, 3 * usage.settings.usage_flush_interval)
        #: Meter events this process sent (tests, bench: Stripe calls per request).
        self.calls = 0
        #: Rows by outcome (``gate_usage_reports_total`` in the metrics).
        self.outcomes: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Run a round now (tests, the CLI)."""
        self._wake.set()

    async def run(self) -> None:
        """Rounds until cancelled: one every few seconds (a tenth of the window, 1 to 10 s)."""
        pause = min(10.0, max(1.0, self._interval / 10))
        while True:
            try:
                await self.round()
            except Exception as exc:  # never stop reporting on a bug: log and go on
                log_event(log, "usage_report_error", level=logging.ERROR, error=repr(exc))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)

    async def round(self) -> int:
        """Send what is due; the number of rows sent (or dropped)."""
        usage = self._usage
        if not usage.settings.billing_enabled:
            return 0
        now = usage.clock.time()
        try:
            rows = await usage.sql.claim_windows(
                usage.counters.holder, now - self._interval - self._grace, now, CLAIM_LEASE, _BATCH
            )
        except StoreError as exc:
            log_event(log, "usage_claim_failed", level=logging.WARNING, error=str(exc))
            return 0
        done = 0
        for i, row in enumerate(rows):
            outcome = await self._send(row, now)
            if outcome is None:  # Stripe unavailable: give the rest back, in order, for later
                for later in rows[i:]:
                    await self._finish(later, now, sent=False)
                break
            done += 1
        return done

    async def _send(self, row: Window, now: float) -> bool | None:
        """True sent, False refused (kept or dropped), None: Stripe unavailable."""
        if row.first_at < now - STRIPE_PAST_LIMIT:
            self.outcomes["dropped"] += 1
            _row_failed(
                "usage_dropped", row, value=row.value, reason="older than Stripe's 35-day window"
            )
            await self._finish(row, now, sent=False, dropped="too_old")
            return False
        if row.value <= 0:
            await self._finish(row, now, sent=True)
            return True
        try:
            self.calls += 1
            await self._usage.stripe.create_meter_event(
                event_name=row.meter,
                customer_id=row.customer_id,
                value=row.value,
                identifier=row.identifier,
                timestamp=int(row.first_at),
            )
        except StripeDuplicateMeterEvent:
            pass  # Stripe has it: sent before, its answer lost
        except StripeRejected as exc:
            _row_failed("usage_report_refused", row, error=str(exc))
            self.outcomes["refused"] += 1
            return False  # claimed still: tried again when the claim's lease ends
        except StripeError as exc:
            self.outcomes["deferred"] += 1
            log_event(log, "usage_report_deferred", level=logging.WARNING, error=str(exc))
            return None
        self.outcomes["sent"] += 1
        await self._finish(row, now, sent=True)
        return True

    async def _finish(
        self, row: Window, now: float, *, sent: bool, dropped: str | None = None
    ) -> None:
        """Mark the claimed row sent or dropped, or give its claim back (neither)."""
        usage = self._usage
        await usage.sql.finish_window(
            usage.counters.holder, row.identifier, now, sent=sent, dropped=dropped
        )


def _row_failed(event: str, row: Window, **fields: object) -> None:
    """An outbox row Stripe did not take (too old to send, refused): an error naming the row."""
    log_event(log, event, level=logging.ERROR, identifier=row.identifier, meter=row.meter, **fields)
