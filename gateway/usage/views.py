"""The customer's usage as people read it: ``api/me``'s ``usage`` list (which the badge shows),
the account page's bars, and ``gateway usage USER``."""

from typing import Any

from gateway.model import Entitlement, Identity, Lookup
from gateway.usage.hook import meter_label, reset_day
from gateway.usage.service import MeterUsage, Usage

__all__ = ["usage_lines", "usage_of_customer"]


def _entitlement(
    usage: Usage, identity: Identity | None, lookup: Lookup | None
) -> Entitlement | None:
    """The customer's entitlement; a signed-in customer without one counts on the free
    quotas (no subscription)."""
    ent = lookup.entitlement if lookup is not None else None
    if ent is not None or identity is None or not identity.customer_id:
        return ent
    now = usage.clock.now()
    return Entitlement(
        customer_id=identity.customer_id, status="none", checked_at=now, expires_at=now
    )


def usage_lines(items: list[MeterUsage]) -> list[dict[str, Any]]:
    """``[{"meter", "used", "limit", "resets_at", "overage", "text", "percent"}]``; ``text``
    is "17 of 20 analyses used · resets on 6 Jan 2027"."""
    out = []
    for u in items:
        resets = reset_day(u.resets_at)
        if u.limit is None:
            text = f"{u.used} {meter_label(u.meter, u.used)} used · resets on {resets}"
            percent = None
        else:
            what = meter_label(u.meter, u.limit)
            text = f"{u.used} of {u.limit} {what} used · resets on {resets}"
            if u.overage and u.used > u.limit:
                text += f" · {u.used - u.limit} billed as overage"
            percent = 100 if u.limit == 0 else min(100, round(100 * u.used / u.limit))
        out.append(
            {
                "meter": u.meter,
                "used": u.used,
                "limit": u.limit,
                "resets_at": u.resets_at.isoformat().replace("+00:00", "Z"),
                "overage": u.overage,
                "text": text,
                "percent": percent,
            }
        )
    return out


async def usage_of_customer(
    usage: Usage, identity: Identity | None, lookup: Lookup | None
) -> list[dict[str, Any]]:
    """The signed-in customer's meters this period, for people (see :func:`usage_lines`)."""
    ent = _entitlement(usage, identity, lookup)
    if ent is None:
        return []
    return usage_lines(await usage.usage_of(ent))
