"""The only module that calls Stripe's API (webhook signatures: :mod:`gateway.stripe_webhooks`).

:class:`StripeAPI` is the narrow interface the rest of the gate uses (plain dicts in, plain dicts
out); :class:`StripeClientAPI` implements it with stripe-python's async ``StripeClient``.
:class:`GuardedStripe` wraps any :class:`StripeAPI` (the real client, or a fake in tests) and is
the one door every call of the gate passes — subscriptions, customers, prices, Checkout, the
portal, events: a process-wide :class:`~gateway.ratelimit.TokenBucket` (one token per call), then
the :class:`CircuitBreaker` (after :data:`BREAKER_THRESHOLD` consecutive transient failures the
calls are skipped for :data:`BREAKER_COOLDOWN` seconds, then one probe goes through).

Every failure becomes one of two exceptions (both :class:`~gateway.errors.GatewayError`):

- :class:`StripeUnavailable` — transient (timeout, connection error, 5xx, 408, 409, 429, or
  :class:`StripeBreakerOpen`: skipped by the breaker): retry later, serve stale state meanwhile;
- :class:`StripeRejected` — any other 4xx, with a JSON body or not (400/401/403/404…): a bug, a
  bad configuration or an object that does not exist; retrying will not help, and it never
  counts against the breaker.

The messages carry the operation, HTTP status, Stripe error code and request id — never the API
key (it is redacted even if an error body echoes it) and never the raw library exception.

:func:`verify_webhook` checks a webhook's ``Stripe-Signature`` with the SDK
(``stripe.Webhook.construct_event``, 300 s tolerance) against each secret of a rotation and hands
back the event as a plain dict, or raises :class:`WebhookSignatureInvalid` /
:class:`WebhookMalformed`.
"""

import asyncio
import functools
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, TypeVar, cast

import aiohttp
import stripe

from gateway.errors import GatewayError
from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock
from gateway.ratelimit import TokenBucket
from gateway.settings import Settings

__all__ = [
    "BREAKER_COOLDOWN",
    "BREAKER_THRESHOLD",
    "BreakerState",
    "CircuitBreaker",
    "GuardedStripe",
    "NoStripe",
    "StripeAPI",
    "StripeBreakerOpen",
    "StripeClientAPI",
    "StripeError",
    "StripeRejected",
    "StripeUnavailable",
    "guarded",
    "map_error",
    "price_from_plan",
    "redact",
]

log = logging.getLogger("gateway.stripe")

T = TypeVar("T")

#: Stripe's maximum page size; lists are read to the end in pages of this size.
PAGE_LIMIT = 100
#: Safety stop for auto-pagination (100 pages of 100 = 10,000 objects).
MAX_PAGES = 100

_SECRET_RE = re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9*]+|\bwhsec_[A-Za-z0-9*]+")
_TRANSIENT = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)
#: 4xx statuses that mean "try again" (timeout, conflict, rate limit); every other 4xx is a
#: rejection, whatever the body (a plain-text 404 is still "no such object").
_TRANSIENT_4XX = frozenset({408, 409, 429})


def _transient(exc: stripe.StripeError) -> bool:
    """By HTTP status when there is one: 5xx and 408/409/429 are transient, any other 4xx a
    rejection (the library calls a non-JSON answer ``APIError`` whatever its status); without
    a status (no answer at all), by the library's kind."""
    status = exc.http_status
    if status is not None and 400 <= status < 500:
        return status in _TRANSIENT_4XX
    return isinstance(exc, _TRANSIENT) or (status is not None and status >= 500)


class StripeError(GatewayError):
    """Base of the gateway's Stripe errors. ``str()`` is safe to log."""

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        http_status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.http_status = http_status
        self.code = code
        self.request_id = request_id


class StripeUnavailable(StripeError):
    """Transient failure: timeout, connection error, 5xx, 408, 409 or 429."""


class StripeBreakerOpen(StripeUnavailable):
    """The call was not made: the circuit breaker is open (Stripe failed repeatedly)."""


class StripeRejected(StripeError):
    """Stripe refused the request (any 4xx but 408/409/429, JSON body or not): bad request,
    unknown object, bad key or permissions."""

    @property
    def not_found(self) -> bool:
        return self.http_status == 404 or self.code == "resource_missing"


class StripeAPI(Protocol):
    """What the gate needs from Stripe. Every method raises :class:`StripeError` subclasses."""

    async def list_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        """All of the customer's subscriptions (``status=all``), every page."""
        ...

    async def list_product_features(self, product_id: str) -> list[dict[str, Any]]:
        """The product's ``product_feature`` attachments (Stripe Entitlements), every page."""
        ...

    async def find_customers(self, email: str) -> list[dict[str, Any]]:
        """Customers whose email is exactly ``email`` (Stripe compares case-sensitively)."""
        ...

    async def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        """The customer, or None if it was deleted or never existed."""
        ...

    async def create_customer(self, email: str, idempotency_key: str) -> dict[str, Any]: ...

    async def get_price(self, price_id: str) -> dict[str, Any]:
        """The price with its ``product`` expanded."""
        ...

    async def create_checkout_session(
        self, params: dict[str, Any], idempotency_key: str
    ) -> dict[str, Any]: ...

    async def get_checkout_session(self, session_id: str) -> dict[str, Any]: ...

    async def create_portal_session(
        self, customer_id: str, return_url: str, flow_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A billing portal session; ``flow_data`` (Stripe's shape, e.g. ``{"type":
        "payment_method_update"}``) deep-links into one of the portal's flows."""
        ...

    async def list_events(self, created_gte: int, types: list[str]) -> list[dict[str, Any]]:
        """Events created at or after ``created_gte`` (of ``types``; all if empty), oldest
        first."""
        ...

    async def close(self) -> None: ...


def redact(text: str, secret: str = "") -> str:
    """``text`` without API keys or webhook secrets (and without ``secret`` itself)."""
    if secret:
        text = text.replace(secret, "<redacted>")
    return _SECRET_RE.sub("<redacted>", text)


def map_error(operation: str, exc: BaseException, secret: str = "") -> StripeError:
    """The gateway exception for a library / network exception (see the module docstring)."""
    if isinstance(exc, stripe.StripeError):
        status = exc.http_status
        transient = _transient(exc)
        kind = type(exc).__name__
        detail = redact(exc.user_message or "", secret)
        parts = [f"stripe {operation} failed: {kind}"]
        if status is not None:
            parts.append(f"http_status={status}")
        if exc.code:
            parts.append(f"code={exc.code}")
        if exc.request_id:
            parts.append(f"request_id={exc.request_id}")
        # Transient messages are Stripe's generic text; a rejection's text names the problem
        # ("No such customer: 'cus_…'"), which is what an operator needs to fix it.
        message = " ".join(parts) + (f": {detail}" if detail and not transient else "")
        cls: type[StripeError] = StripeUnavailable if transient else StripeRejected
        return cls(
            message,
            operation=operation,
            http_status=status,
            code=exc.code,
            request_id=exc.request_id,
        )
    kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
    return StripeUnavailable(f"stripe {operation} failed: {kind}", operation=operation)


def _plain(obj: Any) -> dict[str, Any]:
    """A StripeObject as a plain, recursive dict."""
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict()
    if isinstance(obj, dict):
        return obj
    raise TypeError(f"unexpected Stripe response type {type(obj).__name__}")


class StripeClientAPI:
    """:class:`StripeAPI` on ``stripe.StripeClient`` + ``stripe.AIOHTTPClient``.

    Build it with ``await StripeClientAPI.create(settings)`` inside the running event loop (the
    library's aiohttp session belongs to that loop) and ``await close()`` it on shutdown; the
    gate uses it behind a :class:`GuardedStripe` (rate limit, circuit breaker).
    ``calls`` counts HTTP requests per operation (pages included; the library's own retries of a
    request are not counted separately).
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        http: stripe.AIOHTTPClient,
        *,
        secret: str = "",
    ) -> None:
        self._client = client
        self._http = http
        self._secret = secret
        self._closed = False
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    @classmethod
    async def create(cls, settings: Settings) -> "StripeClientAPI":
        """A client bound to the running loop, configured from ``settings``."""
        asyncio.get_running_loop()  # raises outside a loop: the client must be made inside one
        http = stripe.AIOHTTPClient(timeout=settings.stripe_timeout)
        base: dict[str, str] = {}
        if settings.stripe_api_base:
            base["api"] = settings.stripe_api_base
        client = stripe.StripeClient(
            settings.stripe_secret_key,
            http_client=http,
            base_addresses=cast(Any, base),
            max_network_retries=settings.stripe_max_retries,
        )
        return cls(client, http, secret=settings.stripe_secret_key)

    async def _call(self, operation: str, request: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise StripeUnavailable(
                f"stripe {operation} failed: client closed", operation=operation
            )
        self.calls[operation] += 1
        try:
            return await request()
        except (TimeoutError, stripe.StripeError, aiohttp.ClientError) as exc:
            err = map_error(operation, exc, self._secret)
            self.failures[type(err).__name__] += 1
            log_event(log, "stripe_error", level=logging.DEBUG, error=str(err))
            # `from None`: the library exception may carry request details; ours has the facts.
            raise err from None

    async def _list_all(
        self,
        operation: str,
        fetch: Callable[[dict[str, Any]], Awaitable[Any]],
        params: Mapping[str, Any],
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        after: str | None = None
        for _ in range(MAX_PAGES):
            page_params: dict[str, Any] = {**params, "limit": PAGE_LIMIT}
            if after is not None:
                page_params["starting_after"] = after
            page = await self._call(operation, functools.partial(fetch, page_params))
            data = [_plain(item) for item in page.data]
            items.extend(data)
            if not page.has_more or not data:
                return items
            after = str(data[-1]["id"])
        log_event(
            log,
            "stripe_list_truncated",
            level=logging.WARNING,
            operation=operation,
            pages=MAX_PAGES,
        )
        return items

    async def list_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        subs = self._client.v1.subscriptions
        return await self._list_all(
            "subscriptions.list",
            lambda p: subs.list_async(cast(Any, p)),
            {"customer": customer_id, "status": "all"},
        )

    async def list_product_features(self, product_id: str) -> list[dict[str, Any]]:
        features = self._client.v1.products.features
        return await self._list_all(
            "products.features.list",
            lambda p: features.list_async(product_id, cast(Any, p)),
            {},
        )

    async def find_customers(self, email: str) -> list[dict[str, Any]]:
        customers = self._client.v1.customers
        found = await self._list_all(
            "customers.list", lambda p: customers.list_async(cast(Any, p)), {"email": email}
        )
        return [c for c in found if not c.get("deleted")]

    async def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        customers = self._client.v1.customers
        try:
            customer = _plain(
                await self._call(
                    "customers.retrieve", lambda: customers.retrieve_async(customer_id)
                )
            )
        except StripeRejected as exc:
            if exc.not_found:
                return None
            raise
        return None if customer.get("deleted") else customer

    async def create_customer(self, email: str, idempotency_key: str) -> dict[str, Any]:
        customers = self._client.v1.customers
        return _plain(
            await self._call(
                "customers.create",
                lambda: customers.create_async(
                    {"email": email}, {"idempotency_key": idempotency_key}
                ),
            )
        )

    async def get_price(self, price_id: str) -> dict[str, Any]:
        prices = self._client.v1.prices
        try:
            return _plain(
                await self._call(
                    "prices.retrieve",
                    lambda: prices.retrieve_async(price_id, {"expand": ["product"]}),
                )
            )
        except StripeRejected as exc:
            if not exc.not_found:
                raise
            missing = exc
        # A legacy Plan id (``plan_…`` or a custom id) is a price Stripe's Prices API may not
        # return: ask the Plans API before calling it unknown.
        plans = self._client.v1.plans
        try:
            plan = _plain(
                await self._call(
                    "plans.retrieve",
                    lambda: plans.retrieve_async(price_id, {"expand": ["product"]}),
                )
            )
        except StripeRejected as exc:
            if exc.not_found:
                raise missing from None  # unknown to both: the price's own 404
            raise
        return price_from_plan(plan)

    async def create_checkout_session(
        self, params: dict[str, Any], idempotency_key: str
    ) -> dict[str, Any]:
        sessions = self._client.v1.checkout.sessions
        return _plain(
            await self._call(
                "checkout.sessions.create",
                lambda: sessions.create_async(
                    cast(Any, params), {"idempotency_key": idempotency_key}
                ),
            )
        )

    async def get_checkout_session(self, session_id: str) -> dict[str, Any]:
        sessions = self._client.v1.checkout.sessions
        return _plain(
            await self._call(
                "checkout.sessions.retrieve", lambda: sessions.retrieve_async(session_id)
            )
        )

    async def create_portal_session(
        self, customer_id: str, return_url: str, flow_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        sessions = self._client.v1.billing_portal.sessions
        params: dict[str, Any] = {"customer": customer_id, "return_url": return_url}
        if flow_data:
            params["flow_data"] = flow_data
        return _plain(
            await self._call(
                "billing_portal.sessions.create",
                lambda: sessions.create_async(cast(Any, params)),
            )
        )

    async def list_events(self, created_gte: int, types: list[str]) -> list[dict[str, Any]]:
        events = self._client.v1.events
        params: dict[str, Any] = {"created": {"gte": created_gte}}
        if types:
            params["types"] = list(types)
        found = await self._list_all(
            "events.list", lambda p: events.list_async(cast(Any, p)), params
        )
        # Stripe lists newest first; catching up wants the order they happened in.
        return sorted(found, key=lambda e: (int(e.get("created") or 0), str(e.get("id"))))

    async def close(self) -> None:
        """Close the library's HTTP session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._http.close_async()  # type: ignore[no-untyped-call]


class NoStripe:
    """A :class:`StripeAPI` for billing off (the operator CLI's grants): every call raises
    :class:`StripeUnavailable` without any I/O."""

    @staticmethod
    def _off(operation: str) -> StripeUnavailable:
        return StripeUnavailable("billing is off: Stripe is not called", operation=operation)

    async def list_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        raise self._off("subscriptions.list")

    async def list_product_features(self, product_id: str) -> list[dict[str, Any]]:
        raise self._off("products.features.list")

    async def find_customers(self, email: str) -> list[dict[str, Any]]:
        raise self._off("customers.list")

    async def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        raise self._off("customers.retrieve")

    async def create_customer(self, email: str, idempotency_key: str) -> dict[str, Any]:
        raise self._off("customers.create")

    async def get_price(self, price_id: str) -> dict[str, Any]:
        raise self._off("prices.retrieve")

    async def create_checkout_session(
        self, params: dict[str, Any], idempotency_key: str
    ) -> dict[str, Any]:
        raise self._off("checkout.sessions.create")

    async def get_checkout_session(self, session_id: str) -> dict[str, Any]:
        raise self._off("checkout.sessions.retrieve")

    async def create_portal_session(
        self, customer_id: str, return_url: str, flow_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        raise self._off("billing_portal.sessions.create")

    async def list_events(self, created_gte: int, types: list[str]) -> list[dict[str, Any]]:
        raise self._off("events.list")

    async def close(self) -> None:
        return None


# --- the one door: rate limit and circuit breaker --------------------------------------------

#: Consecutive transient Stripe failures that open the circuit breaker.
BREAKER_THRESHOLD = 5
#: Seconds the breaker stays open before one probe call is let through.
BREAKER_COOLDOWN = 30.0

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Stops calling a failing Stripe for a while.

    closed → (``threshold`` consecutive failures) → open → (``cooldown`` elapsed) → half_open:
    one probe call is allowed; its success closes the breaker, its failure re-opens it. State
    changes are logged once each.
    """

    def __init__(
        self,
        threshold: int = BREAKER_THRESHOLD,
        cooldown: float = BREAKER_COOLDOWN,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.threshold = threshold
        self.cooldown = float(cooldown)
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # times opened, for metrics

    @property
    def state(self) -> BreakerState:
        if (
            self._state == "open"
            and self._opened_at is not None
            and self._clock.time() >= self._opened_at + self.cooldown
        ):
            self._set("half_open")
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to Stripe now (in half-open state: the one probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state != "closed":
            self._opened_at = None
            self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self._state == "half_open" or (
            self._state == "closed" and self._failures >= self.threshold
        ):
            self._opened_at = self._clock.time()
            self.opened += 1
            self._set("open")

    def release(self) -> None:
        """A call ended without a verdict (cancelled): let another probe through."""
        self._probing = False

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            level = logging.WARNING if state == "open" else logging.INFO
            log_event(
                log,
                "stripe_breaker",
                level=level,
                state=state,
                failures=self._failures,
                cooldown_s=self.cooldown,
            )


class GuardedStripe:
    """A :class:`StripeAPI` that sends every call of ``inner`` through one rate limiter and one
    circuit breaker (see the module docstring). The gate builds one per process and hands the
    same one to everything that calls Stripe.

    The limiter takes one token per call (a paginated list, rare, takes one for all its pages).
    The breaker counts :class:`StripeUnavailable` as a failure and :class:`StripeRejected` as
    an answer (Stripe is up; the caller decides what a "no" means); a cancelled call is neither.
    While it is open, calls raise :class:`StripeBreakerOpen` without reaching ``inner``.
    """

    def __init__(
        self,
        inner: StripeAPI,
        *,
        limiter: TokenBucket | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.inner = inner
        self.limiter = limiter
        self.breaker = breaker if breaker is not None else CircuitBreaker(clock=clock)

    @property
    def calls(self) -> Counter[str] | None:
        """HTTP requests per operation, if ``inner`` counts them (the real client does)."""
        calls = getattr(self.inner, "calls", None)
        return calls if isinstance(calls, Counter) else None

    @property
    def failures(self) -> Counter[str] | None:
        """Failed requests per error class, if ``inner`` counts them."""
        failures = getattr(self.inner, "failures", None)
        return failures if isinstance(failures, Counter) else None

    async def _guarded(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():  # before the limiter: a skipped call costs no token
            raise StripeBreakerOpen(
                f"stripe {operation} skipped: circuit breaker open", operation=operation
            )
        try:
            if self.limiter is not None:
                await self.limiter.acquire()
            result = await call()
        except StripeUnavailable as exc:
            self.breaker.failure()
            log_event(log, "stripe_unavailable", level=logging.WARNING, error=str(exc))
            raise
        except StripeRejected:
            self.breaker.success()
            raise
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        return result

    async def list_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        return await self._guarded(
            "subscriptions.list", functools.partial(self.inner.list_subscriptions, customer_id)
        )

    async def list_product_features(self, product_id: str) -> list[dict[str, Any]]:
        return await self._guarded(
            "products.features.list",
            functools.partial(self.inner.list_product_features, product_id),
        )

    async def find_customers(self, email: str) -> list[dict[str, Any]]:
        return await self._guarded(
            "customers.list", functools.partial(self.inner.find_customers, email)
        )

    async def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        return await self._guarded(
            "customers.retrieve", functools.partial(self.inner.get_customer, customer_id)
        )

    async def create_customer(self, email: str, idempotency_key: str) -> dict[str, Any]:
        return await self._guarded(
            "customers.create",
            functools.partial(self.inner.create_customer, email, idempotency_key),
        )

    async def get_price(self, price_id: str) -> dict[str, Any]:
        return await self._guarded(
            "prices.retrieve", functools.partial(self.inner.get_price, price_id)
        )

    async def create_checkout_session(
        self, params: dict[str, Any], idempotency_key: str
    ) -> dict[str, Any]:
        return await self._guarded(
            "checkout.sessions.create",
            functools.partial(self.inner.create_checkout_session, params, idempotency_key),
        )

    async def get_checkout_session(self, session_id: str) -> dict[str, Any]:
        return await self._guarded(
            "checkout.sessions.retrieve",
            functools.partial(self.inner.get_checkout_session, session_id),
        )

    async def create_portal_session(
        self, customer_id: str, return_url: str, flow_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self._guarded(
            "billing_portal.sessions.create",
            functools.partial(self.inner.create_portal_session, customer_id, return_url, flow_data),
        )

    async def list_events(self, created_gte: int, types: list[str]) -> list[dict[str, Any]]:
        return await self._guarded(
            "events.list", functools.partial(self.inner.list_events, created_gte, types)
        )

    async def close(self) -> None:
        await self.inner.close()


def guarded(
    stripe_api: StripeAPI, settings: Settings, *, clock: Clock = SYSTEM_CLOCK
) -> GuardedStripe:
    """``stripe_api`` behind the door (limiter at ``settings.stripe_rate``, a new breaker);
    an already guarded one as it is."""
    if isinstance(stripe_api, GuardedStripe):
        return stripe_api
    return GuardedStripe(stripe_api, limiter=TokenBucket(settings.stripe_rate), clock=clock)


def price_from_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """A legacy Plan object in the shape of a Price (``unit_amount``, ``recurring``), as far
    as the gate reads prices."""
    return {
        "id": plan.get("id"),
        "object": "price",
        "active": plan.get("active", True),
        "currency": plan.get("currency"),
        "nickname": plan.get("nickname"),
        "product": plan.get("product"),
        "unit_amount": plan.get("amount"),
        "recurring": {
            "interval": plan.get("interval"),
            "interval_count": plan.get("interval_count") or 1,
            "usage_type": plan.get("usage_type", "licensed"),
        },
        "type": "recurring",
    }
