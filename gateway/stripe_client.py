"""The only module that calls Stripe's API: :class:`StripeClientAPI`, the gate's one
:class:`~gateway.stripe_api.StripeAPI`, on stripe-python's async ``StripeClient``.

Every request of every operation passes :meth:`StripeClientAPI._call`, the one door: the
:class:`~gateway.stripe_breaker.CircuitBreaker` first (while it is open the request is skipped
with :class:`~gateway.stripe_api.StripeBreakerOpen` and costs no token), then the process-wide
:class:`~gateway.ratelimit.TokenBucket` (one token per HTTP request: a paginated list takes one
per page), then the request; its failure is mapped by :func:`~gateway.stripe_api.map_error`.
The breaker counts :class:`~gateway.stripe_api.StripeUnavailable` as a failure and
:class:`~gateway.stripe_api.StripeRejected` as an answer (Stripe is up; the caller decides what a
"no" means); a cancelled call is neither.

With billing off (:meth:`StripeClientAPI.off`) there is no network client: every call raises
:class:`~gateway.stripe_api.StripeUnavailable` without any I/O, and the breaker is not touched.
"""

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import aiohttp
import stripe

from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock
from gateway.ratelimit import TokenBucket
from gateway.settings import Settings
from gateway.stripe_api import (
    StripeBreakerOpen,
    StripeRejected,
    StripeUnavailable,
    map_error,
    price_from_plan,
)
from gateway.stripe_breaker import CircuitBreaker

__all__ = ["MAX_PAGES", "PAGE_LIMIT", "StripeClientAPI"]

log = logging.getLogger("gateway.stripe")

T = TypeVar("T")

#: Stripe's maximum page size; lists are read to the end in pages of this size.
PAGE_LIMIT = 100
#: Safety stop for auto-pagination (100 pages of 100 = 10,000 objects).
MAX_PAGES = 100


def _plain(obj: Any) -> dict[str, Any]:
    """A StripeObject as a plain, recursive dict."""
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict()
    if isinstance(obj, dict):
        return obj
    raise TypeError(f"unexpected Stripe response type {type(obj).__name__}")


class StripeClientAPI:
    """:class:`~gateway.stripe_api.StripeAPI` on ``stripe.StripeClient`` +
    ``stripe.AIOHTTPClient``, with the rate limiter and circuit breaker inside (see the module
    docstring).

    Build it with ``await StripeClientAPI.create(settings, clock=…)`` inside the running event
    loop (the library's aiohttp session belongs to that loop) and ``await close()`` it on
    shutdown; the gate builds one per process (:func:`gateway.services.open_services`) and hands
    the same one to everything that calls Stripe.
    ``calls`` counts HTTP requests per operation (pages included; the library's own retries of a
    request are not counted separately); ``failures`` counts failed ones per error class.
    """

    def __init__(
        self,
        client: stripe.StripeClient | None,
        http: stripe.AIOHTTPClient | None,
        *,
        secret: str = "",
        limiter: TokenBucket | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._client = client
        self._http = http
        self._secret = secret
        self._closed = False
        self.limiter = limiter
        self.breaker = breaker if breaker is not None else CircuitBreaker(clock=clock)
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    @classmethod
    async def create(cls, settings: Settings, *, clock: Clock = SYSTEM_CLOCK) -> "StripeClientAPI":
        """A client bound to the running loop, configured from ``settings`` (a limiter at
        ``stripe_rate`` on the monotonic clock, a new breaker on ``clock``)."""
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
        limiter = TokenBucket(settings.stripe_rate)
        return cls(client, http, secret=settings.stripe_secret_key, limiter=limiter, clock=clock)

    @classmethod
    def off(cls, *, clock: Clock = SYSTEM_CLOCK) -> "StripeClientAPI":
        """Billing off (the operator CLI's grants): every call raises
        :class:`~gateway.stripe_api.StripeUnavailable` without any I/O."""
        return cls(None, None, clock=clock)

    @property
    def client(self) -> stripe.StripeClient:
        """The library's client (only reached inside a request given to :meth:`_call`, so
        never when billing is off)."""
        assert self._client is not None
        return self._client

    async def _call(self, operation: str, request: Callable[[], Awaitable[T]]) -> T:
        """One HTTP request of ``operation``: breaker, limiter, request, error mapping."""
        if self._client is None:
            raise StripeUnavailable("billing is off: Stripe is not called", operation=operation)
        if self._closed:
            raise StripeUnavailable(
                f"stripe {operation} failed: client closed", operation=operation
            )
        if not self.breaker.allow():  # before the limiter: a skipped call costs no token
            raise StripeBreakerOpen(
                f"stripe {operation} skipped: circuit breaker open", operation=operation
            )
        try:
            if self.limiter is not None:
                await self.limiter.acquire()
            self.calls[operation] += 1
            try:
                result = await request()
            except (TimeoutError, stripe.StripeError, aiohttp.ClientError) as exc:
                err = map_error(operation, exc, self._secret)
                self.failures[type(err).__name__] += 1
                log_event(log, "stripe_error", level=logging.DEBUG, error=str(err))
                # `from None`: the library exception may carry request details; ours the facts.
                raise err from None
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
        return await self._list_all(
            "subscriptions.list",
            lambda p: self.client.v1.subscriptions.list_async(cast(Any, p)),
            {"customer": customer_id, "status": "all"},
        )

    async def list_product_features(self, product_id: str) -> list[dict[str, Any]]:
        return await self._list_all(
            "products.features.list",
            lambda p: self.client.v1.products.features.list_async(product_id, cast(Any, p)),
            {},
        )

    async def find_customers(self, email: str) -> list[dict[str, Any]]:
        found = await self._list_all(
            "customers.list",
            lambda p: self.client.v1.customers.list_async(cast(Any, p)),
            {"email": email},
        )
        return [c for c in found if not c.get("deleted")]

    async def get_customer(self, customer_id: str) -> dict[str, Any] | None:
        try:
            customer = _plain(
                await self._call(
                    "customers.retrieve",
                    lambda: self.client.v1.customers.retrieve_async(customer_id),
                )
            )
        except StripeRejected as exc:
            if exc.not_found:
                return None
            raise
        return None if customer.get("deleted") else customer

    async def create_customer(self, email: str, idempotency_key: str) -> dict[str, Any]:
        return _plain(
            await self._call(
                "customers.create",
                lambda: self.client.v1.customers.create_async(
                    {"email": email}, {"idempotency_key": idempotency_key}
                ),
            )
        )

    async def get_price(self, price_id: str) -> dict[str, Any]:
        try:
            return _plain(
                await self._call(
                    "prices.retrieve",
                    lambda: self.client.v1.prices.retrieve_async(price_id, {"expand": ["product"]}),
                )
            )
        except StripeRejected as exc:
            if not exc.not_found:
                raise
            missing = exc
        # A legacy Plan id (``plan_…`` or a custom id) is a price Stripe's Prices API may not
        # return: ask the Plans API before calling it unknown.
        try:
            plan = _plain(
                await self._call(
                    "plans.retrieve",
                    lambda: self.client.v1.plans.retrieve_async(price_id, {"expand": ["product"]}),
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
        return _plain(
            await self._call(
                "checkout.sessions.create",
                lambda: self.client.v1.checkout.sessions.create_async(
                    cast(Any, params), {"idempotency_key": idempotency_key}
                ),
            )
        )

    async def get_checkout_session(self, session_id: str) -> dict[str, Any]:
        return _plain(
            await self._call(
                "checkout.sessions.retrieve",
                lambda: self.client.v1.checkout.sessions.retrieve_async(session_id),
            )
        )

    async def create_portal_session(
        self, customer_id: str, return_url: str, flow_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"customer": customer_id, "return_url": return_url}
        if flow_data:
            params["flow_data"] = flow_data
        return _plain(
            await self._call(
                "billing_portal.sessions.create",
                lambda: self.client.v1.billing_portal.sessions.create_async(cast(Any, params)),
            )
        )

    async def list_events(self, created_gte: int, types: list[str]) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"created": {"gte": created_gte}}
        if types:
            params["types"] = list(types)
        found = await self._list_all(
            "events.list", lambda p: self.client.v1.events.list_async(cast(Any, p)), params
        )
        # Stripe lists newest first; catching up wants the order they happened in.
        return sorted(found, key=lambda e: (int(e.get("created") or 0), str(e.get("id"))))

    async def create_meter_event(
        self, *, event_name: str, customer_id: str, value: int, identifier: str, timestamp: int
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "event_name": event_name,
            "payload": {"stripe_customer_id": customer_id, "value": str(int(value))},
            "identifier": identifier,
            "timestamp": int(timestamp),
        }
        return _plain(
            await self._call(
                "billing.meter_events.create",
                lambda: self.client.v1.billing.meter_events.create_async(cast(Any, params)),
            )
        )

    async def list_meters(self) -> list[dict[str, Any]]:
        return await self._list_all(
            "billing.meters.list",
            lambda p: self.client.v1.billing.meters.list_async(cast(Any, p)),
            {},
        )

    async def meter_event_summaries(
        self, *, meter_id: str, customer_id: str, start_time: int, end_time: int
    ) -> list[dict[str, Any]]:
        return await self._list_all(
            "billing.meters.event_summaries.list",
            lambda p: self.client.v1.billing.meters.event_summaries.list_async(
                meter_id, cast(Any, p)
            ),
            {"customer": customer_id, "start_time": int(start_time), "end_time": int(end_time)},
        )

    async def close(self) -> None:
        """Close the library's HTTP session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._http is not None:
            await self._http.close_async()  # type: ignore[no-untyped-call]
