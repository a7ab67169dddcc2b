"""What the gate tells a user about their account (the business logic behind the account page,
``api/me``, the badge and the email sign-in), apart from the handlers that show it."""

from datetime import UTC, datetime
from typing import Any

from babel.dates import format_date, format_datetime

from gateway.entitlement import Entitlements
from gateway.model import Access, Entitlement, Identity, Lookup
from gateway.plans import PlanCatalog
from gateway.rules import access, features
from gateway.settings import Settings
from gateway.store import SessionRow

__all__ = [
    "STATUS_TEXT",
    "account_summary",
    "best_customer",
    "describe",
    "format_day",
    "in_days",
    "remaining",
    "session_list",
    "short_plan",
]


#: What the account page, the badge and ``api/me`` (``status_text``) call each access reason.
STATUS_TEXT = {
    "active": "Active",
    "trialing": "Trial",
    "canceling": "Won't renew",
    "grant": "Free access",
    "grant_expired": "Free access ended",
    "price_not_allowed": "Plan not sold here",
    "trial_ended": "Trial ended",
    "ended": "Ended",
    "collection_paused": "Payments paused",
    "past_due_grace": "Payment failed",
    "past_due": "Payment failed",
    "unpaid": "Payment failed",
    "incomplete": "Payment not completed",
    "incomplete_expired": "Payment not completed",
    "canceled": "Ended",
    "paused": "Paused",
    "none": "No subscription",
    "unknown_status": "Unknown — see billing",
}
#: Access reasons whose fix is a new card: Manage billing opens the portal's card screen.
CARD_REASONS = ("past_due_grace", "past_due", "unpaid")


def format_day(at: datetime) -> str:
    """A date as users read it: ``1 Jan 2027`` (babel, English medium format, UTC)."""
    return format_date(at, "medium", locale="en_GB")


def in_days(days: int) -> str:
    """``in 5 days``, ``in 1 day``, ``today``."""
    if days <= 0:
        return "today"
    return f"in {days} day" if days == 1 else f"in {days} days"


def remaining(days: int) -> str:
    """What is left, as the account page's "Remaining" row says it: ``31 days``, ``1 day``,
    ``Less than a day``."""
    if days <= 0:
        return "Less than a day"
    return "1 day" if days == 1 else f"{days} days"


def ended_at(ent: Entitlement | None, acc: Access, now: datetime) -> datetime | None:
    """When an ended subscription ended, as far as the cached state tells: the access's own
    past end, else the scheduled cancellation (``cancel_at``) that ended a canceled one.
    None for one canceled at once (Stripe's ``ended_at`` is not kept)."""
    if acc.allowed or ent is None:
        return None
    if acc.ends_at is not None and acc.ends_at <= now:
        return acc.ends_at
    if ent.status == "canceled" and ent.cancel_at is not None:
        return ent.cancel_at
    return None


def short_plan(name: str | None, app_name: str) -> str:
    """``Pro`` for ``PatentLLM Pro`` on PatentLLM (the app's name is already on the page)."""
    if not name:
        return "Subscription"
    rest = name[len(app_name) :].strip() if name.startswith(app_name + " ") else ""
    return rest or name


def describe(acc: Access, now: datetime, plan: str = "Subscription") -> str:
    """The account in plain words: ``Pro · renews on 1 Jan 2027 (in 31 days)``, ``Ends on
    1 Jan 2027 — won't renew. Resume in billing``, ``Trial · ends in 5 days``, ``Payment
    failed — update your card``. ``plan``: the short plan name (:func:`short_plan`)."""
    days = acc.days_left(now)
    on = format_day(acc.ends_at) if acc.ends_at else ""
    when = f" ({in_days(days)})" if days is not None else ""
    reason = acc.reason
    if reason in CARD_REASONS:
        return "Payment failed — update your card"
    if reason == "canceling":
        return f"Ends on {on} — won't renew. Resume in billing"
    if reason == "trialing":
        return f"Trial · ends {in_days(days)}" if days is not None else "Trial"
    if reason == "active":
        return f"{plan} · renews on {on}{when}" if on else f"{plan} · active"
    if reason == "grant":
        return f"Free access · ends on {on}{when}" if on else "Free access"
    if reason == "collection_paused":
        return "Payments paused — resume in billing"
    if reason in ("ended", "trial_ended", "grant_expired") and on:
        return f"{STATUS_TEXT[reason]} on {on}"
    if reason == "paused":
        return "Paused — add a card in billing to continue"
    return STATUS_TEXT.get(reason, STATUS_TEXT["unknown_status"])


def account_summary(
    settings: Settings,
    plans: PlanCatalog,
    identity: Identity | None,
    lookup: Lookup | None,
    now: datetime,
) -> dict[str, Any]:
    """The account facts shared by the account page, ``api/me`` and the badge. ``status``
    and ``reason`` are Stripe's and the gate's codes (for programs); ``status_text``,
    ``summary`` and ``ends_on`` are what users read."""
    ent = lookup.entitlement if lookup else None
    acc = access(ent, settings, now)
    plan = plans.name_for(ent.price_id if ent else None)
    return {
        "signed_in": identity is not None,
        "email": identity.email if identity else None,
        "customer_id": identity.customer_id if identity else None,
        "billing_enabled": settings.billing_enabled,
        "allowed": acc.allowed,
        "status": ent.status if ent else "none",
        "reason": acc.reason,
        "status_text": STATUS_TEXT.get(acc.reason, STATUS_TEXT["unknown_status"]),
        "plan": plan,
        "plan_short": short_plan(plan, settings.app_name),
        "price_id": ent.price_id if ent else None,
        "ends_at": acc.ends_at.isoformat() if acc.ends_at else None,
        "ends_on": format_day(acc.ends_at) if acc.ends_at else None,
        "ends_kind": acc.ends_kind,
        "days_left": acc.days_left(now),
        "in_days": in_days(d) if (d := acc.days_left(now)) is not None else None,
        "remaining": remaining(d) if d is not None else None,
        "ended_on": format_day(e) if (e := ended_at(ent, acc, now)) else None,
        "summary": describe(acc, now, short_plan(plan, settings.app_name)),
        "portal_flow": "payment_method_update" if acc.reason in CARD_REASONS else None,
        "stale": bool(lookup and lookup.stale),
        "unavailable": bool(lookup and lookup.error),
        "features": sorted(features(ent, acc, settings)),
    }


def _when(at: datetime) -> str:
    return format_datetime(at, "d MMM y, HH:mm", tzinfo=UTC, locale="en_GB") + " UTC"


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
