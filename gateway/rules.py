"""Access rules: what a customer's Stripe subscriptions are worth at a given time (pure, no I/O).

:func:`summarize` turns the subscriptions Stripe lists for a customer into one
:class:`~gateway.model.Entitlement` (the best subscription, with its cache lifetime);
:func:`access` turns an entitlement into an :class:`~gateway.model.Access` at a time ``now``.
``access`` runs on every gated request, so it only compares a few fields.

The access table (first matching row wins; the end is what "N days left" counts down to):

| Stripe state | Access | `reason` | End (`ends_kind`) |
|---|---|---|---|
| no customer, no subscription | no | `none` | — |
| operator grant (`source=grant`) | until `period_end` [1] | `grant` | `period_end` (`ends`) |
| price not in `STRIPE_PRICE_IDS` [2] | no | `price_not_allowed` | — |
| `active` | yes, even past `period_end` [3] | `active` | `period_end` (`renews`) |
| `active`/`trialing` canceling at period end | until then | `canceling` | `period_end` (`ends`) |
| `active`/`trialing`, `cancel_at` set | until `cancel_at` | `canceling` | `cancel_at` (`ends`) |
| `trialing` | until `trial_end` | `trialing` | `trial_end` (`trial_ends`) |
| one of the 3 rows above, end passed [4] | no | `ended`, `trial_ended` | the past end |
| `active`/`trialing`, payments paused | `PAUSED_ACCESS` (no) | `collection_paused` | as above |
| `past_due` | `PAST_DUE_GRACE` (0: no) [5] | `past_due_grace`, `past_due` | grace end (`ends`) |
| `incomplete`, `incomplete_expired`, `unpaid`, `canceled`, `paused` | no | the status | — |
| any other status | no | `unknown_status` | — |

[1] No ``period_end``: forever; once passed: no, reason ``grant_expired``. Grants skip every
other row (price included). [2] Checked for ``active``, ``trialing`` and ``past_due`` only; an
empty ``STRIPE_PRICE_IDS`` allows no price (fail closed) unless ``ALLOW_ANY_PRICE=true``.
[3] An ``active`` subscription whose period just ended is normally renewed by Stripe within
minutes or an hour; Stripe is the source of truth for the status, so it keeps access.
[4] A scheduled end (cancellation, trial end) is not extended by a stale cache: once it has
passed, access ends even if Stripe has not been asked again yet. The earliest scheduled end
wins; on a tie "ends" beats "trial_ends" (a trial set to cancel ends, it does not convert).
[5] Grace counts from the end of the last *paid* period, i.e. the current ``period_start``:
Stripe advances the period at renewal even when the renewal invoice then fails, so
``period_end`` of a past-due subscription is a whole unpaid period away. No ``period_start``:
no grace. The grace never runs past ``cancel_at`` (or ``period_end`` when canceling).
"Payments paused" means ``pause_collection`` is set (e.g. from the Customer Portal).

Notes on the choices:

- Several subscriptions: one that grants access beats one that does not; among granting ones the
  latest access end wins (no end counts as the latest). Among the others the most telling one is
  kept for the account page: an allowed price first, then ``active``/``trialing`` (paused or ended)
  > ``past_due`` > ``unpaid`` > ``paused`` > ``incomplete`` > ``canceled`` > ``incomplete_expired``,
  then the latest period end.
- Price: the first item whose price (``price.id``, else legacy ``plan.id``) is allowed, else the
  first item's. Period: the item with the latest ``current_period_end`` (API versions since
  2025-03-31), else the top-level ``current_period_end`` / ``current_period_start`` (older ones).
- Cache lifetime (``expires_at``): granting → ``now + CACHE_TTL`` but never past the access end
  (period end, ``cancel_at``, ``trial_end`` or grace end) of any granting subscription (their
  features are the customer's: one ending first takes its features along); when that end has
  already passed (an ``active`` subscription awaiting its renewal) → ``now +
  NEGATIVE_CACHE_TTL`` so the renewal is seen soon without asking Stripe on every request.
  Non-granting → ``now + NEGATIVE_CACHE_TTL``.
- Features (:func:`feature_sources`): only the subscriptions these rules grant access, and in
  them only the items whose price they allow, say which products' features the customer has.
  Never Stripe's active entitlements: those are the union over *every* subscription of the
  customer — an unsold $1 price, a legacy Plan, a paused subscription included.
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from gateway.model import Access, EndsKind, Entitlement, from_unix
from gateway.settings import Settings

__all__ = ["access", "feature_sources", "features", "summarize"]

_DENIED_STATUSES = ("incomplete", "incomplete_expired", "unpaid", "canceled", "paused", "none")
#: Preallocated verdicts without an end: ``access`` runs per request.
_DENIED: dict[str, Access] = {s: Access(False, s) for s in _DENIED_STATUSES}
_UNKNOWN = Access(False, "unknown_status")
_PRICE_NOT_ALLOWED = Access(False, "price_not_allowed")
_NO_ENTITLEMENT = _DENIED["none"]
_GRANT_FOREVER = Access(True, "grant")

#: How telling a non-granting subscription is (higher is kept), see the module docstring.
_DENIED_RANK = {
    "active": 8,
    "trialing": 8,
    "past_due": 7,
    "unpaid": 6,
    "paused": 5,
    "incomplete": 4,
    "canceled": 3,
    "incomplete_expired": 2,
}
_FOREVER = float("inf")


# --------------------------------------------------------------------------- access (hot)


def access(ent: Entitlement | None, settings: Settings, now: datetime) -> Access:
    """What ``ent`` grants at ``now``: the module docstring's table. Pure and cheap."""
    if ent is None:
        return _NO_ENTITLEMENT
    if ent.source == "grant":
        end = ent.period_end
        if end is None:
            return _GRANT_FOREVER
        return Access(end > now, "grant" if end > now else "grant_expired", end, "ends")
    status = ent.status
    if status == "active" or status == "trialing":
        if not _price_allowed(ent.price_id, settings):
            return _PRICE_NOT_ALLOWED
        end, kind = _scheduled_end(ent)
        if end is not None and end <= now:
            return Access(False, "trial_ended" if kind == "trial_ends" else "ended", end, kind)
        if end is None:
            end = ent.period_end
            kind = "renews" if end is not None else None
        if ent.paused:
            return Access(settings.paused_access, "collection_paused", end, kind)
        reason = status if kind != "ends" else "canceling"
        return Access(True, reason, end, kind)
    if status == "past_due":
        if not _price_allowed(ent.price_id, settings):
            return _PRICE_NOT_ALLOWED
        return _past_due(ent, settings, now)
    return _DENIED.get(status, _UNKNOWN)


_NO_FEATURES: frozenset[str] = frozenset()


def features(ent: Entitlement | None, acc: Access, settings: Settings) -> frozenset[str]:
    """The features ``ent`` carries with the access ``acc`` the rules granted it: none without
    access (a canceled subscription's features count for nothing), every feature
    ``FEATURE_RULES`` names for an operator grant, else those read with the subscriptions (the
    features of :func:`feature_sources`) plus ``PRICE_FEATURES`` of the entitlement's price."""
    if ent is None or not acc.allowed:
        return _NO_FEATURES
    if ent.source == "grant":
        return settings.feature_table.features
    extra = settings.price_feature_map.get(ent.price_id or "")
    return ent.features | extra if extra else ent.features


def _price_allowed(price_id: str | None, settings: Settings) -> bool:
    return settings.allow_any_price or (
        price_id is not None and price_id in settings.stripe_price_ids
    )


def _scheduled_end(ent: Entitlement) -> tuple[datetime | None, EndsKind | None]:
    """The earliest end Stripe has scheduled (cancellation or trial end), if any."""
    end: datetime | None = None
    kind: EndsKind | None = None
    if ent.cancel_at is not None:
        end, kind = ent.cancel_at, "ends"
    if (
        ent.cancel_at_period_end
        and ent.period_end is not None
        and (end is None or ent.period_end < end)
    ):
        end, kind = ent.period_end, "ends"
    if ent.status == "trialing":
        trial_end = ent.trial_end or ent.period_end
        if trial_end is not None and (end is None or trial_end < end):
            end, kind = trial_end, "trial_ends"
    return end, kind


def _past_due(ent: Entitlement, settings: Settings, now: datetime) -> Access:
    grace = settings.past_due_grace
    if grace <= 0 or ent.period_start is None:
        return Access(False, "past_due")
    end = ent.period_start + timedelta(seconds=grace)
    if ent.cancel_at is not None and ent.cancel_at < end:
        end = ent.cancel_at
    if ent.cancel_at_period_end and ent.period_end is not None and ent.period_end < end:
        end = ent.period_end
    if end <= now:
        return Access(False, "past_due", end, "ends")
    return Access(True, "past_due_grace", end, "ends")


# --------------------------------------------------------------------------- summarize


def summarize(
    customer_id: str,
    subscriptions: Sequence[Mapping[str, Any]],
    settings: Settings,
    now: datetime,
    *,
    source: str = "stripe",
    event_created: int = 0,
) -> Entitlement:
    """The best of a customer's subscriptions (Stripe JSON, e.g. ``obj.to_dict()``), with its
    cache lifetime. No subscriptions → status ``"none"``. ``now`` must be timezone-aware."""
    if now.tzinfo is None:
        raise ValueError("summarize() needs a timezone-aware `now`")
    best: Entitlement | None = None
    best_rank: tuple[float, float, float, float] | None = None
    expires: datetime | None = None
    for sub in subscriptions:
        ent = _from_subscription(customer_id, sub, settings, now, source, event_created)
        acc = access(ent, settings, now)
        rank = _rank(ent, acc, settings)
        if best_rank is None or rank > best_rank:
            best, best_rank = ent, rank
        if acc.allowed:
            end = _expires_at(acc, settings, now)
            expires = end if expires is None else min(expires, end)
    if best is None:
        return Entitlement(
            customer_id=customer_id,
            status="none",
            checked_at=now,
            expires_at=now + timedelta(seconds=settings.negative_cache_ttl),
            source=source,
            event_created=event_created,
        )
    if expires is None:  # nothing grants access
        expires = now + timedelta(seconds=settings.negative_cache_ttl)
    return replace(best, expires_at=expires)


def feature_sources(
    subscriptions: Sequence[Mapping[str, Any]], settings: Settings, now: datetime
) -> tuple[tuple[str, str | None], ...]:
    """``(price id, product id)`` of every item, with a price the rules allow, of every
    subscription they grant access at ``now``: where the customer's features come from (the
    products' features, ``PRICE_FEATURES`` of the prices). The product id is None when Stripe
    did not say (an item's ``price.product``, else a legacy item's ``plan.product``)."""
    found: dict[tuple[str, str | None], None] = {}
    for sub in subscriptions:
        ent = _from_subscription("", sub, settings, now, "stripe", 0)
        if not access(ent, settings, now).allowed:
            continue
        for item in _items(sub):
            price = item.get("price")
            if not isinstance(price, Mapping | str):
                price = item.get("plan")
            price_id = _object_id(price)
            if price_id is None or not _price_allowed(price_id, settings):
                continue
            product = price.get("product") if isinstance(price, Mapping) else None
            found[(price_id, _object_id(product))] = None
    return tuple(found)


def _rank(ent: Entitlement, acc: Access, settings: Settings) -> tuple[float, float, float, float]:
    if acc.allowed:
        end = acc.ends_at.timestamp() if acc.ends_at is not None else _FOREVER
        return (1.0, end, 1.0 if acc.ends_kind == "renews" else 0.0, 0.0)
    price_ok = 1.0 if _price_allowed(ent.price_id, settings) else 0.0
    recent = ent.period_end.timestamp() if ent.period_end is not None else 0.0
    return (0.0, price_ok, float(_DENIED_RANK.get(ent.status, 1)), recent)


def _expires_at(acc: Access, settings: Settings, now: datetime) -> datetime:
    if not acc.allowed:
        return now + timedelta(seconds=settings.negative_cache_ttl)
    expires = now + timedelta(seconds=settings.cache_ttl)
    end = acc.ends_at
    if end is not None and end < expires:
        if end > now:
            return end
        # The end passed (an active subscription awaiting its renewal): look again soon.
        return now + timedelta(seconds=min(settings.negative_cache_ttl, settings.cache_ttl))
    return expires


def _from_subscription(
    customer_id: str,
    sub: Mapping[str, Any],
    settings: Settings,
    now: datetime,
    source: str,
    event_created: int,
) -> Entitlement:
    items = _items(sub)
    period_end: datetime | None = None
    period_start: datetime | None = None
    for item in items:
        end = _time(item.get("current_period_end"))
        if end is not None and (period_end is None or end > period_end):
            period_end, period_start = end, _time(item.get("current_period_start"))
    if period_end is None:  # API versions before 2025-03-31.basil
        period_end = _time(sub.get("current_period_end"))
        period_start = _time(sub.get("current_period_start"))
    status = sub.get("status")
    sub_id = sub.get("id")
    return Entitlement(
        customer_id=customer_id,
        status=status if isinstance(status, str) and status else "unknown",
        checked_at=now,
        expires_at=now,  # set by summarize once the best subscription is known
        subscription_id=sub_id if isinstance(sub_id, str) else None,
        price_id=_choose_price(items, settings),
        period_end=period_end,
        cancel_at_period_end=sub.get("cancel_at_period_end") is True,
        cancel_at=_time(sub.get("cancel_at")),
        trial_end=_time(sub.get("trial_end")),
        paused=bool(sub.get("pause_collection")),
        source=source,
        event_created=event_created,
        period_start=period_start,
        meters=_metered(items),
    )


def _metered(items: list[Mapping[str, Any]]) -> frozenset[str]:
    """The meters (``mtr_…``) of the items' metered prices (``recurring.usage_type=metered``
    with ``recurring.meter``): usage on them past a quota is billed, not refused."""
    found: set[str] = set()
    for item in items:
        price = item.get("price")
        recurring = price.get("recurring") if isinstance(price, Mapping) else None
        if isinstance(recurring, Mapping) and recurring.get("usage_type") == "metered":
            meter = recurring.get("meter")
            if isinstance(meter, str) and meter:
                found.add(meter)
    return frozenset(found)


def _items(sub: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = sub.get("items")
    data = items.get("data") if isinstance(items, Mapping) else None
    if not isinstance(data, Sequence) or isinstance(data, str):
        return []
    return [item for item in data if isinstance(item, Mapping)]


def _choose_price(items: list[Mapping[str, Any]], settings: Settings) -> str | None:
    """The first allowed price among the items, else the first item's price."""
    first: str | None = None
    for item in items:
        price_id = _object_id(item.get("price")) or _object_id(item.get("plan"))
        if price_id is None:
            continue
        if settings.allow_any_price or price_id in settings.stripe_price_ids:
            return price_id
        if first is None:
            first = price_id
    return first


def _object_id(value: Any) -> str | None:
    """``value`` is an expanded object (``{"id": …}``) or, unexpanded, the id itself."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _time(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return from_unix(value)
