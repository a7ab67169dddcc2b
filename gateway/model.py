"""Shared value types of the request flow (no I/O here).

``Identity`` is *who* (from ``identity``), ``Entitlement`` is *what they paid for* (from
``entitlement``), ``Access`` is what the access rules make of an entitlement at a given time
(from ``rules``), ``RequestFacts`` is what ``decision`` needs to know about the request,
its verdict is :class:`Allow` or a :class:`Denial` (the refusal as a value, rendered by
``responses``), and :class:`Pass` what the gate hands the proxy for an allowed request. All
datetimes are timezone-aware UTC.

:class:`Clock` is the one source of time: the services share one instance (tests inject a
manual one), so what is cached with one reading (L1 entries, remembered verdicts, session
ends) is compared with the same clock, and tests on an injected clock run the production path.
"""

import time as _time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Literal

__all__ = [
    "SYSTEM_CLOCK",
    "Access",
    "Allow",
    "Clock",
    "Denial",
    "DenialKind",
    "EndsKind",
    "Entitlement",
    "Identity",
    "IdentitySource",
    "Lookup",
    "ManualClock",
    "Pass",
    "RememberedBy",
    "RequestFacts",
    "from_unix",
    "utcnow",
]

IdentitySource = Literal["cookie", "header", "grant", "key"]
#: What a remembered verdict is keyed on (:class:`Pass`).
RememberedBy = Literal["cookie", "header", "key"]
EndsKind = Literal["renews", "ends", "trial_ends"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Clock:
    """The time: :meth:`now` (aware UTC datetime) and :meth:`time` (Unix seconds, float), both
    readings of one clock. This one is the system's; :class:`ManualClock` is for tests."""

    __slots__ = ()

    def now(self) -> datetime:
        return datetime.now(UTC)

    # The builtin itself, not a method calling it: read on every cached request (hot path).
    time = staticmethod(_time.time)


#: The system clock, the default of everything that reads the time.
SYSTEM_CLOCK = Clock()


class ManualClock(Clock):
    """A clock that stands still until :meth:`advance` moves it (tests, simulations)."""

    __slots__ = ("_t",)

    def __init__(self, start: datetime | float | None = None) -> None:
        if start is None:
            start = _time.time()
        self._t = start.timestamp() if isinstance(start, datetime) else float(start)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._t, UTC)

    def time(self) -> float:
        return self._t

    def set(self, when: datetime | float) -> None:
        """Put the clock at ``when``."""
        self._t = when.timestamp() if isinstance(when, datetime) else float(when)

    def advance(self, seconds: float | timedelta) -> None:
        """Move the clock forward (or back, with a negative amount)."""
        self._t += seconds.total_seconds() if isinstance(seconds, timedelta) else seconds


def from_unix(ts: int | float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking. ``customer_id`` is known for cookie sessions; header identities carry
    only an email until the entitlement layer maps it to a Stripe customer."""

    email: str | None
    customer_id: str | None
    source: IdentitySource

    @property
    def key(self) -> str:
        if self.customer_id:
            return self.customer_id
        return f"email:{(self.email or '').lower()}"


@dataclass(frozen=True, slots=True)
class Entitlement:
    """A customer's best subscription, as last read from Stripe (or granted by an operator)."""

    customer_id: str
    status: str  # the best subscription's Stripe status, or "none"
    checked_at: datetime  # when this was read from Stripe
    expires_at: datetime  # end of the cache lifetime (fresh until then)
    subscription_id: str | None = None
    price_id: str | None = None
    period_end: datetime | None = None
    cancel_at_period_end: bool = False
    cancel_at: datetime | None = None
    trial_end: datetime | None = None
    paused: bool = False  # pause_collection set
    source: str = "stripe"  # stripe | webhook | success | grant
    event_created: int = 0  # `created` of the newest webhook event applied
    # Start of the current period = end of the last *paid* one. Stripe advances the period at
    # renewal even when the renewal invoice then fails, so `past_due` grace counts from here
    # (counting from period_end would grant a whole unpaid period). None → no grace.
    period_start: datetime | None = None
    # The feature lookup keys of the subscriptions the rules accepted (their products' and
    # prices' features, :func:`gateway.rules.feature_sources`), read with them; what they are
    # worth at a time is :func:`gateway.rules.features` (only with access).
    features: frozenset[str] = frozenset()
    # The meters (Stripe ``mtr_…`` ids) of the metered prices (``recurring.meter``) on the
    # subscriptions the rules accepted: usage past a quota on one of them is billed as overage.
    meters: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Lookup:
    """Result of an entitlement lookup for one identity.

    ``entitlement`` is None when the user has no Stripe customer (``error`` None) or when the
    state is unknown because Stripe failed and nothing usable was cached (``error`` set).
    ``stale`` marks an entitlement served past its lifetime because Stripe failed.
    """

    entitlement: Entitlement | None
    stale: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Access:
    allowed: bool
    reason: str  # active | trialing | canceling | past_due_grace | past_due | paused | ...
    ends_at: datetime | None = None
    ends_kind: EndsKind | None = None

    def days_left(self, now: datetime) -> int | None:
        if self.ends_at is None:
            return None
        seconds = (self.ends_at - now).total_seconds()
        return max(0, int(-(-seconds // 86400)))  # ceil: "ends in 1 day" until it has ended


@dataclass(frozen=True, slots=True)
class RequestFacts:
    method: str
    path: str  # normalized path
    query: str  # raw query string, for `next`
    accepts_html: bool
    is_websocket: bool
    is_navigation: bool  # a top-level browser navigation (not fetch/XHR)
    feature: str | None = None  # the feature FEATURE_RULES require for the path, if any
    # Where a browser goes back to after a non-navigation refusal (an API call, a stream):
    # the page it was on (:func:`gateway.decision.back_of`), never the API path itself.
    back: str = "/"
    # The path and query as sent: a denial's ``next_path`` (through safe_next).
    target: str = "/"


@dataclass(frozen=True, slots=True)
class Allow:
    """The decision lets the request in: why (``billing_off``, ``fail_open`` or the access
    reason), the customer's ``features`` (:func:`gateway.rules.features`, none without access)
    and the ``access`` the rules granted (None where they were not asked: billing off, fail
    open)."""

    reason: str
    features: frozenset[str] = frozenset()
    access: Access | None = None

    kind: ClassVar[Literal["allow"]] = "allow"


@dataclass(slots=True, eq=False)
class Pass:
    """The gate lets a request through: the ``X-Gate-*`` ``headers`` for upstream (read-only,
    possibly shared between requests), and whether this is a verdict the gate *remembers* for
    the next requests — ``remembered``: ``"cookie"`` (per raw ``Cookie`` header), ``"header"``
    (per trusted identity-header value) or None (not kept) — until ``until`` (Unix seconds on
    the services' clock) for paths needing none or one of ``features``. Forward auth lets a
    proxy cache only a verdict remembered for a cookie (the shipped cache is keyed on it)."""

    headers: Mapping[str, str]
    remembered: RememberedBy | None = None
    until: float = 0.0
    features: frozenset[str] = frozenset()
    #: The entitlement the verdict rests on (usage quotas read its price and period).
    entitlement: Entitlement | None = None


DenialKind = Literal[
    "redirect",
    "unauthorized",
    "payment_required",
    "feature_required",
    "unavailable",
    "bad_request",
    "api_key",  # an API key that lets nobody in (401), or one in the URL (400)
    "rate_limited",  # an API key over API_KEY_RATE (429)
]


@dataclass(frozen=True, slots=True)
class Denial:
    """The gate refuses a request: what kind of refusal, and the facts every surface needs to
    render it (:mod:`gateway.responses` does, for the proxy, forward auth and WebSockets).

    ``status`` is the HTTP status on the gate's own proxy path, ``reason`` the error code of
    the JSON body (``login_required``, ``subscription_required``, ``billing_unavailable``,
    ``bad_request``, ``feature_required``). ``location`` is the relative subscribe URL of a
    ``redirect`` (the upgrade page of a ``feature_required``: 303 for navigations, else 402);
    ``next_path`` the original path and query, validated by :func:`gateway.paths.safe_next`
    (where "Try again" and the subscribe page lead back to); ``retry_after`` seconds for
    ``unavailable``; ``feature`` the feature a ``feature_required`` denial is about (the customer
    pays, for a plan without it: browsers get the upgrade page, APIs 402).
    """

    kind: DenialKind
    status: int
    reason: str
    location: str | None = None
    next_path: str = "/"
    retry_after: int | None = None
    feature: str | None = None
