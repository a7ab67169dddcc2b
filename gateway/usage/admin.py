"""``gateway usage USER`` (what a customer used this period, per meter) and ``gateway usage
reconcile [--period YYYY-MM]`` (the store's counts against Stripe's meter event summaries for
a calendar month, UTC; one line per difference)."""

import argparse
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from gateway.model import Entitlement
from gateway.stripe_api import StripeError
from gateway.usage.service import Usage, month_of
from gateway.usage.views import usage_lines

__all__ = ["period_bounds", "reconcile", "show"]


def period_bounds(text: str | None, now: float) -> tuple[float, float]:
    """``YYYY-MM`` (default: the month holding ``now``) as (start, end), UTC;
    :class:`ValueError` for anything else."""
    if not text:
        return month_of(now)
    try:
        day = datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"--period={text!r} is invalid: expected YYYY-MM, e.g. 2027-01") from None
    return month_of(day.timestamp())


async def show(
    usage: Usage,
    customer_ids: list[str],
    lookup: Callable[[str], Awaitable[Entitlement | None]],
) -> int:
    """Print each customer's meters this period (``lookup``: customer id → entitlement)."""
    await usage.refresh_meter_ids()  # which meters a metered price bills (overage)
    for customer_id in customer_ids:
        ent = await lookup(customer_id)
        lines = usage_lines(await usage.usage_of(ent)) if ent is not None else []
        if not lines:
            print(f"{customer_id}: no usage this period")
            continue
        for line in lines:
            print(f"{customer_id}  {line['meter']}  {line['text']}")
    return 0


async def reconcile(usage: Usage, args: argparse.Namespace) -> int:
    """Store vs Stripe for the period; 0 when they agree (units still in the outbox are
    listed as pending), 1 when something differs."""
    try:
        start, end = period_bounds(getattr(args, "period", None), usage.clock.time())
    except ValueError as exc:
        print(f"gateway: {exc}")
        return 2
    await usage.refresh_meter_ids()
    totals = await usage.sql.window_totals(start, end)
    if not totals:
        print("no usage counted in the period")
        return 0
    differ = 0
    for (customer_id, meter), (counted, sent) in sorted(totals.items()):
        meter_id = usage.meter_id(meter)
        if meter_id is None:
            print(f"{customer_id}  {meter}  counted={counted}  stripe=?  (no Stripe meter)")
            differ += 1
            continue
        try:
            summaries = await usage.stripe.meter_event_summaries(
                meter_id=meter_id, customer_id=customer_id, start_time=int(start), end_time=int(end)
            )
        except StripeError as exc:
            print(f"{customer_id}  {meter}  counted={counted}  stripe=?  ({exc})")
            differ += 1
            continue
        in_stripe = int(sum(float(s.get("aggregated_value") or 0) for s in summaries))
        pending = counted - sent
        # ok: Stripe has every unit; pending: what is missing is still in the outbox (the
        # reporter sends it); DIFFERS: Stripe disagrees with what the gate sent.
        mark = "ok" if in_stripe == counted else "pending" if in_stripe == sent else "DIFFERS"
        if mark == "DIFFERS":
            differ += 1
        print(
            f"{customer_id}  {meter}  counted={counted}  sent={sent}  pending={pending}  "
            f"stripe={in_stripe}  {mark}"
        )
    print(f"{len(totals)} (customer, meter) pairs, {differ} differing")
    return 1 if differ else 0
