"""The gate's Stripe surface: the :class:`StripeAPI` interface and its errors.

:class:`StripeAPI` is the narrow interface the rest of the gate uses (plain dicts in, plain dicts
out). Its one implementation is :class:`~gateway.stripe_client.StripeClientAPI` (stripe-python's
async ``StripeClient``, with the process's rate limiter and
:class:`~gateway.stripe_breaker.CircuitBreaker` inside its one ``_call``); tests that must hold or
count a call precisely implement the interface directly.

Every failure becomes one of two exceptions (both :class:`~gateway.errors.GatewayError`):

- :class:`StripeUnavailable` — transient (timeout, connection error, 5xx, 408, 409, 429, or
  :class:`StripeBreakerOpen`: skipped by the breaker; or billing off): retry later, serve stale
  state meanwhile;
- :class:`StripeRejected` — any other 4xx, with a JSON body or not (400/401/403/404…): a bug, a
  bad configuration or an object that does not exist; retrying will not help, and it never
  counts against the breaker.

The messages carry the operation, HTTP status, Stripe error code and request id — never the API
key (it is redacted even if an error body echoes it) and never the raw library exception
(:func:`map_error`). Webhook signatures: :mod:`gateway.stripe_webhooks`.
"""

import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol

import stripe

from gateway.errors import GatewayError
from gateway.stripe_breaker import CircuitBreaker

__all__ = [
    "StripeAPI",
    "StripeBreakerOpen",
    "StripeDuplicateMeterEvent",
    "StripeError",
    "StripeRejected",
    "StripeUnavailable",
    "map_error",
    "price_from_plan",
    "redact",
]

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


@dataclass(eq=False, repr=False)
class StripeError(GatewayError):
    """Base of the gateway's Stripe errors: the message (``str()``, safe to log) and, keyword
    only, the facts of the failed call."""

    message: str
    _: KW_ONLY
    operation: str
    http_status: int | None = None
    code: str | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)


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


class StripeDuplicateMeterEvent(StripeRejected):
    """Stripe already holds a meter event with this ``identifier`` (its answer: 400
    ``invalid_request_error``, "An event already exists with identifier …", not retryable).
    For a deterministic identifier that means the usage was counted: treat it as sent."""

    duplicate = True


#: The start of Stripe's message for a meter event whose identifier it has seen (no error code).
DUPLICATE_METER_EVENT = "An event already exists with identifier"


class StripeAPI(Protocol):
    """What the gate needs from Stripe. Every method raises :class:`StripeError` subclasses.

    ``breaker`` is the circuit breaker in front of the calls (health and metrics read it)."""

    breaker: CircuitBreaker

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

    async def create_meter_event(
        self, *, event_name: str, customer_id: str, value: int, identifier: str, timestamp: int
    ) -> dict[str, Any]:
        """One ``billing.meter_event`` (``payload[value]`` sent as the integer's string).
        A duplicate ``identifier`` raises :class:`StripeDuplicateMeterEvent`."""
        ...

    async def list_meters(self) -> list[dict[str, Any]]:
        """Every ``billing.meter`` of the account (all statuses), every page."""
        ...

    async def meter_event_summaries(
        self, *, meter_id: str, customer_id: str, start_time: int, end_time: int
    ) -> list[dict[str, Any]]:
        """The meter's ``billing.meter_event_summary`` objects for the customer in
        ``[start_time, end_time)``, every page."""
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
        if status == 400 and (exc.user_message or "").startswith(DUPLICATE_METER_EVENT):
            cls = StripeDuplicateMeterEvent
        return cls(
            message,
            operation=operation,
            http_status=status,
            code=exc.code,
            request_id=exc.request_id,
        )
    kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
    return StripeUnavailable(f"stripe {operation} failed: {kind}", operation=operation)


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
            "meter": plan.get("meter"),
            "usage_type": plan.get("usage_type", "licensed"),
        },
        "type": "recurring",
    }
