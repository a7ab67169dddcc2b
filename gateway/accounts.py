"""What the gate tells a user about their account (the business logic behind the account page,
``api/me``, the badge and the email sign-in), apart from the handlers that show it."""

from datetime import datetime
from typing import Any

from gateway.entitlement import Entitlements
from gateway.model import Access, Identity, Lookup
from gateway.plans import PlanCatalog
from gateway.rules import access, features
from gateway.settings import Settings
from gateway.store import SessionRow

__all__ = ["account_summary", "best_customer", "describe", "session_list"]


def describe(acc: Access, now: datetime) -> str:
    """``renews in 3 days``, ``ends in 1 day``, ``trial ends in 5 days``; "" with no end."""
    days = acc.days_left(now)
    if acc.ends_kind is None or days is None:
        return ""
    unit = "day" if days == 1 else "days"
    return {
        "renews": f"renews in {days} {unit}",
        "ends": f"ends in {days} {unit}",
        "trial_ends": f"trial ends in {days} {unit}",
    }[acc.ends_kind]


def account_summary(
    settings: Settings,
    plans: PlanCatalog,
    identity: Identity | None,
    lookup: Lookup | None,
    now: datetime,
) -> dict[str, Any]:
    """The account facts shared by the account page, ``api/me`` and the badge."""
    ent = lookup.entitlement if lookup else None
    acc = access(ent, settings, now)
    return {
        "signed_in": identity is not None,
        "email": identity.email if identity else None,
        "customer_id": identity.customer_id if identity else None,
        "billing_enabled": settings.billing_enabled,
        "allowed": acc.allowed,
        "status": ent.status if ent else "none",
        "reason": acc.reason,
        "plan": plans.name_for(ent.price_id if ent else None),
        "price_id": ent.price_id if ent else None,
        "ends_at": acc.ends_at.isoformat() if acc.ends_at else None,
        "ends_kind": acc.ends_kind,
        "days_left": acc.days_left(now),
        "summary": describe(acc, now),
        "stale": bool(lookup and lookup.stale),
        "unavailable": bool(lookup and lookup.error),
        "features": sorted(features(ent, acc, settings)),  # plans-tiers: the customer's features
    }


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def session_list(rows: list[SessionRow], current: str | None) -> list[dict[str, Any]]:
    """The account page's list of active sessions: device, created, last seen, and which one
    is this browser's (``current``: its session handle)."""
    return [
        {
            "device": row.device or "Unknown device",
            "created": _when(row.created_at),
            "last_seen": _when(row.last_seen),
            "current": row.id_hash == current,
        }
        for row in rows
    ]


async def best_customer(
    entitlements: Entitlements, settings: Settings, email: str, now: datetime
) -> str | None:
    """The customer with the best access at ``now`` among those with this email (Stripe allows
    several): access first, then the latest end. Raises :class:`~gateway.stripe_api.StripeError`."""
    ids = await entitlements.customers_for_email(email)
    best: tuple[tuple[bool, float], str] | None = None
    for customer_id in ids:
        lookup = await entitlements.lookup(Identity(email, customer_id, "cookie"))
        acc = access(lookup.entitlement, settings, now)
        rank = (acc.allowed, acc.ends_at.timestamp() if acc.ends_at else 0.0)
        if best is None or rank > best[0]:
            best = (rank, customer_id)
    return best[1] if best else None
