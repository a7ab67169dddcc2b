"""The only module that calls Stripe.

:class:`StripeAPI` is the narrow interface the rest of the gate uses (plain dicts in, plain dicts
out); :class:`StripeClientAPI` implements it with stripe-python's async ``StripeClient``. Every
HTTP request to Stripe waits for a token of one process-wide :class:`~gateway.ratelimit.TokenBucket`
and every failure becomes one of two exceptions:

- :class:`StripeUnavailable` — transient (timeout, connection error, 5xx, 429, non-JSON answer):
  retry later, serve stale state meanwhile;
- :class:`StripeRejected` — Stripe understood and said no (400/401/403/404…): a bug, a bad
  configuration or an object that does not exist; retrying will not help.

The messages carry the operation, HTTP status, Stripe error code and request id — never the API
key (it is redacted even if an error body echoes it) and never the raw library exception.
"""

import asyncio
import functools
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

import aiohttp
import stripe

from gateway.logs import log_event
from gateway.ratelimit import TokenBucket
from gateway.settings import Settings

log = logging.getLogger("gateway.stripe")

T = TypeVar("T")

#: Stripe's maximum page size; lists are read to the end in pages of this size.
PAGE_LIMIT = 100
#: Safety stop for auto-pagination (100 pages of 100 = 10,000 objects).
MAX_PAGES = 100

_SECRET_RE = re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9*]+|\bwhsec_[A-Za-z0-9*]+")
_TRANSIENT = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)


class StripeError(Exception):
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
    """Transient failure: timeout, connection error, 5xx, 429 or a non-JSON answer."""


class StripeRejected(StripeError):
    """Stripe refused the request (4xx): bad request, unknown object, bad key or permissions."""

    @property
    def not_found(self) -> bool:
        return self.http_status == 404 or self.code == "resource_missing"


class StripeAPI(Protocol):
    """What the gate needs from Stripe. Every method raises :class:`StripeError` subclasses."""

    async def list_subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        """All of the customer's subscriptions (``status=all``), every page."""
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

    async def create_portal_session(self, customer_id: str, return_url: str) -> dict[str, Any]: ...

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
        transient = isinstance(exc, _TRANSIENT) or (status is not None and status >= 500)
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
    library's aiohttp session belongs to that loop) and ``await close()`` it on shutdown.
    ``calls`` counts HTTP requests per operation (pages included; the library's own retries of a
    request are not counted separately).
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        http: stripe.AIOHTTPClient,
        limiter: TokenBucket,
        *,
        secret: str = "",
    ) -> None:
        self._client = client
        self._http = http
        self._limiter = limiter
        self._secret = secret
        self._closed = False
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    @classmethod
    async def create(
        cls, settings: Settings, *, limiter: TokenBucket | None = None
    ) -> "StripeClientAPI":
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
        return cls(
            client,
            http,
            limiter or TokenBucket(settings.stripe_rate),
            secret=settings.stripe_secret_key,
        )

    async def _call(self, operation: str, request: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise StripeUnavailable(
                f"stripe {operation} failed: client closed", operation=operation
            )
        await self._limiter.acquire()
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
        return _plain(
            await self._call(
                "prices.retrieve",
                lambda: prices.retrieve_async(price_id, {"expand": ["product"]}),
            )
        )

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

    async def create_portal_session(self, customer_id: str, return_url: str) -> dict[str, Any]:
        sessions = self._client.v1.billing_portal.sessions
        return _plain(
            await self._call(
                "billing_portal.sessions.create",
                lambda: sessions.create_async({"customer": customer_id, "return_url": return_url}),
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
