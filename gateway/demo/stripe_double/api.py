"""The ``/v1`` API handlers of the Stripe test double.

Each handler decodes Stripe's form parameters, calls the double's operations, answers the
Stripe-shaped JSON (honouring ``expand``) and hands the events the call produced to background
delivery. Authentication, fault injection and idempotency are the double's middleware's job.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.demo.stripe_double import lists, objects, previews, sessions
from gateway.demo.stripe_double.form import (
    REQUEST_ID,
    ApiError,
    Params,
    missing,
    one_of,
    param_bool,
    param_dict,
    param_int,
    param_list,
    param_required,
    param_str,
    read_params,
)
from gateway.demo.stripe_double.handlers import DoubleHandlers
from gateway.demo.stripe_double.invoicing import meter_items
from gateway.demo.stripe_double.objects import Obj

if TYPE_CHECKING:
    from gateway.demo.stripe_double.double import StripeDouble

__all__ = ["LIST_STATUSES", "StripeApi", "found"]

LIST_STATUSES = ("all", "ended")


def _created_filter(params: Params) -> tuple[int | None, int | None, int | None, int | None]:
    """``created=TS`` or ``created[gte|gt|lte|lt]=TS`` → (gte, gt, lte, lt)."""
    value = params.get("created")
    if value is None:
        return None, None, None, None
    if isinstance(value, str):
        exact = param_int(params, "created")
        return exact, None, exact, None
    if not isinstance(value, dict):
        raise ApiError(400, "Invalid created filter", param="created")
    return (
        param_int(value, "gte"),
        param_int(value, "gt"),
        param_int(value, "lte"),
        param_int(value, "lt"),
    )


def found(table: dict[str, Obj], kind: str, object_id: str) -> Obj:
    """``table[object_id]``, or Stripe's 404 for a ``kind`` it does not have."""
    if object_id not in table:
        raise missing(kind, object_id)
    return table[object_id]


class StripeApi(DoubleHandlers):
    """Routes and handlers of the double's Stripe API."""

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/customers", self.create_customer),
            self.listing_route("/v1/customers", lambda d: d.customers, email=param_str),
            web.get("/v1/customers/{id}", self.retrieve_customer),
            web.post("/v1/customers/{id}", self.update_customer),
            web.delete("/v1/customers/{id}", self.delete_customer),
            self.listing_route(
                "/v1/prices", lambda d: d.prices, active=param_bool, product=param_str
            ),
            self.retrieve_route("/v1/prices/{id}", lambda d, i: d.get_price(i)),
            self.retrieve_route("/v1/plans/{id}", lambda d, i: d.get_plan(i)),
            self.listing_route("/v1/products", lambda d: d.products, active=param_bool),
            self.retrieve_route("/v1/products/{id}", lambda d, i: found(d.products, "product", i)),
            web.post("/v1/subscriptions", self.create_subscription),
            web.get("/v1/subscriptions", self.list_subscriptions),
            self.retrieve_route("/v1/subscriptions/{id}", lambda d, i: d.get_subscription(i)),
            web.post("/v1/subscriptions/{id}", self.update_subscription),
            web.delete("/v1/subscriptions/{id}", self.cancel_subscription),
            web.post("/v1/checkout/sessions", self.create_checkout_session),
            self.listing_route(
                "/v1/checkout/sessions",
                lambda d: d.checkout_sessions,
                customer=param_str,
                status=param_str,
                subscription=param_str,
            ),
            self.retrieve_route(
                "/v1/checkout/sessions/{id}",
                lambda d, i: found(d.checkout_sessions, "checkout.session", i),
            ),
            web.post("/v1/billing_portal/sessions", self.create_portal_session),
            web.get("/v1/promotion_codes", self.list_promotion_codes),
            self.retrieve_route(
                "/v1/promotion_codes/{id}",
                lambda d, i: found(d.promotion_codes, "promotion_code", i),
            ),
            self.retrieve_route("/v1/coupons/{id}", lambda d, i: found(d.coupons, "coupon", i)),
            web.get("/v1/events", self.list_events),
            web.get("/v1/events/{id}", self.retrieve_event),
            self.listing_route(
                "/v1/invoices", lambda d: d.invoices, customer=param_str, subscription=param_str
            ),
            self.retrieve_route("/v1/invoices/{id}", lambda d, i: found(d.invoices, "invoice", i)),
            web.post("/v1/invoices/create_preview", self.create_invoice_preview),
        ]

    # --- helpers ---------------------------------------------------------------------------------

    def respond(self, obj: Obj, params: Params, status: int = 200) -> web.Response:
        """JSON of ``obj`` (a copy) with the ``expand[]`` paths expanded."""
        body = copy.deepcopy(obj)
        for path in param_list(params, "expand"):
            if not isinstance(path, str):
                raise ApiError(400, "Invalid expand", param="expand")
            if path in ("tiers", "data.tiers"):  # a price's tiers: only when expanded, as Stripe
                prices = body["data"] if path == "data.tiers" else [body]
                for price in prices:
                    price["tiers"] = copy.deepcopy(self.double.price_tiers.get(price["id"], []))
                continue
            lists.expand(body, path.split("."), self.double.resolve)
        return web.json_response(body, status=status)

    def done(self, request: web.Request, events: list[Obj]) -> None:
        """Tag the events with the API request that caused them, deliver them later."""
        for evt in events:
            evt["request"] = {
                "id": request.get(REQUEST_ID),
                "idempotency_key": request.headers.get("Idempotency-Key"),
            }
        self.double.webhooks.deliver_later(events)

    @staticmethod
    def newest_first(table: dict[str, Obj]) -> list[Obj]:
        return list(reversed(table.values()))

    def listing_route(
        self,
        path: str,
        table: Callable[[StripeDouble], dict[str, Obj]],
        **filters: Callable[[Params, str], Any],
    ) -> web.RouteDef:
        """``GET path``: the ``table``'s objects, newest first, those whose fields equal the
        ``filters`` parameters given (each parameter read with its reader, e.g.
        :func:`param_str`)."""

        async def handler(request: web.Request) -> web.Response:
            params = await read_params(request)
            wanted = {name: read(params, name) for name, read in filters.items()}
            return self.listing(self.newest_first(table(self.double)), params, path, **wanted)

        return web.get(path, handler)

    def retrieve_route(self, path: str, find: Callable[[StripeDouble, str], Obj]) -> web.RouteDef:
        """``GET path`` (ending in ``{id}``): the object ``find`` gives for the id."""

        async def handler(request: web.Request) -> web.Response:
            params = await read_params(request)
            return self.respond(find(self.double, request.match_info["id"]), params)

        return web.get(path, handler)

    def listing(self, items: list[Obj], params: Params, path: str, **equal: Any) -> web.Response:
        """A page of ``items`` keeping those whose fields equal the ``equal`` filters (a
        filter of ``None``: not asked for)."""
        kept = [o for o in items if all(v is None or o[k] == v for k, v in equal.items())]
        return self.respond(lists.paginate(kept, params, path), params)

    # --- customers ------------------------------------------------------------------------------

    async def create_customer(self, request: web.Request) -> web.Response:
        params = await read_params(request)
        events: list[Obj] = []
        cust = self.double.new_customer(
            param_str(params, "email"),
            param_str(params, "name"),
            param_dict(params, "metadata") or {},
            events,
        )
        for field in ("description", "phone"):
            if field in params:
                cust[field] = param_str(params, field)
        self.done(request, events)
        return self.respond(cust, params)

    async def retrieve_customer(self, request: web.Request) -> web.Response:
        params = await read_params(request)
        object_id = request.match_info["id"]
        if object_id in self.double.deleted_customers:
            return self.respond(self.double.deleted_customers[object_id], params)
        return self.respond(self.double.get_customer(object_id), params)

    async def update_customer(self, request: web.Request) -> web.Response:
        params = await read_params(request)
        cust = self.double.get_customer(request.match_info["id"])
        previous: Obj = {}
        for field in ("email", "name", "description", "phone"):
            if field in params and cust[field] != param_str(params, field):
                previous[field], cust[field] = cust[field], param_str(params, field) or None
        metadata = param_dict(params, "metadata")
        if metadata is not None:
            merged = {**cust["metadata"], **metadata} if metadata else {}
            merged = {k: v for k, v in merged.items() if v != ""}
            if merged != cust["metadata"]:
                previous["metadata"], cust["metadata"] = cust["metadata"], merged
        events: list[Obj] = []
        if previous:
            self.double.record("customer.updated", cust, events, previous)
        self.done(request, events)
        return self.respond(cust, params)

    async def delete_customer(self, request: web.Request) -> web.Response:
        """Deleting a customer cancels their subscriptions, as on Stripe."""
        params = await read_params(request)
        cust = self.double.get_customer(request.match_info["id"])
        events: list[Obj] = []
        for sub in self.double.customer_subscriptions(cust["id"]):
            if sub["status"] not in objects.ENDED_STATUSES:
                self.double.cancel_subscription_now(sub, events)
        del self.double.customers[cust["id"]]
        stub = objects.deleted(cust)
        self.double.deleted_customers[cust["id"]] = stub
        self.double.record("customer.deleted", cust, events)
        self.done(request, events)
        return self.respond(stub, params)

    # --- subscriptions --------------------------------------------------------------------------

    async def create_subscription(self, request: web.Request) -> web.Response:
        params = await read_params(request)
        items = param_list(params, "items")
        if not items or not all(isinstance(i, dict) and i.get("price") for i in items):
            raise ApiError(
                400,
                "The double creates subscriptions with one licensed item (items[0][price]) "
                "and metered ones after it.",
                param="items",
            )
        metered = meter_items(self.double, items[1:], "items", first=1)
        events: list[Obj] = []
        sub = self.double.new_subscription(
            param_required(params, "customer"),
            str(items[0]["price"]),
            trial_days=param_int(params, "trial_period_days", 0) or 0,
            quantity=param_int(items[0], "quantity", 1) or 1,
            metadata=param_dict(params, "metadata"),
            out=events,
            metered=metered,
        )
        self.done(request, events)
        return self.respond(sub, params)

    async def list_subscriptions(self, request: web.Request) -> web.Response:
        """Filters: customer, price, status (default: all but canceled; ``all``; ``ended``)."""
        params = await read_params(request)
        customer, price = param_str(params, "customer"), param_str(params, "price")
        status = param_str(params, "status")
        if status is not None:
            one_of(status, objects.SUBSCRIPTION_STATUSES + LIST_STATUSES, "status")

        def wanted(sub: Obj) -> bool:
            if status is None:
                return bool(sub["status"] != "canceled")
            if status == "ended":
                return sub["status"] in objects.ENDED_STATUSES
            return status == "all" or sub["status"] == status

        items = [
            s
            for s in self.newest_first(self.double.subscriptions)
            if wanted(s)
            and (
                price is None or any(objects.item_price_id(i) == price for i in s["items"]["data"])
            )
        ]
        return self.listing(items, params, "/v1/subscriptions", customer=customer)

    async def update_subscription(self, request: web.Request) -> web.Response:
        return await self._change_subscription(request, self.double.update_subscription_now)

    async def cancel_subscription(self, request: web.Request) -> web.Response:
        return await self._change_subscription(
            request, lambda sub, _params, events: self.double.cancel_subscription_now(sub, events)
        )

    async def _change_subscription(
        self, request: web.Request, change: Callable[[Obj, Params, list[Obj]], object]
    ) -> web.Response:
        """``change(subscription, params, events)`` on the subscription of the path; the
        subscription as it is after."""
        params = await read_params(request)
        sub = self.double.get_subscription(request.match_info["id"])
        events: list[Obj] = []
        change(sub, params, events)
        self.done(request, events)
        return self.respond(sub, params)

    async def create_invoice_preview(self, request: web.Request) -> web.Response:
        return await previews.create_preview(self, request)

    # --- checkout and portal ---------------------------------------------------------------------

    async def create_checkout_session(self, request: web.Request) -> web.Response:
        params = await read_params(request)
        return self.respond(sessions.create_checkout_session(self.double, params), params)

    async def create_portal_session(self, request: web.Request) -> web.Response:
        params = await read_params(request)
        return self.respond(sessions.create_portal_session(self.double, params), params)

    # --- promotion codes --------------------------------------------------------------------------

    async def list_promotion_codes(self, request: web.Request) -> web.Response:
        params = await read_params(request)
        code = param_str(params, "code")
        items = [
            p
            for p in self.newest_first(self.double.promotion_codes)
            if code is None or p["code"].upper() == code.upper()  # Stripe: case-insensitive
        ]
        active = param_bool(params, "active")
        return self.listing(items, params, "/v1/promotion_codes", active=active)

    # --- events and invoices --------------------------------------------------------------------

    async def list_events(self, request: web.Request) -> web.Response:
        """Filters: ``type`` (``customer.subscription.*`` wildcards too), ``types[]``,
        ``created`` / ``created[gte|gt|lte|lt]``."""
        params = await read_params(request)
        types = [t for t in [param_str(params, "type"), *param_list(params, "types")] if t]
        gte, gt, lte, lt = _created_filter(params)

        def wanted(evt: Obj) -> bool:
            kind, created = str(evt["type"]), int(evt["created"])
            return (
                (
                    not types
                    or any(
                        kind == t or (t.endswith(".*") and kind.startswith(t[:-1])) for t in types
                    )
                )
                and (gte is None or created >= gte)
                and (gt is None or created > gt)
                and (lte is None or created <= lte)
                and (lt is None or created < lt)
            )

        items = [e for e in reversed(self.double.events) if wanted(e)]
        return self.respond(lists.paginate(items, params, "/v1/events"), params)

    async def retrieve_event(self, request: web.Request) -> web.Response:
        params = await read_params(request)
        event_id = request.match_info["id"]
        for evt in self.double.events:
            if evt["id"] == event_id:
                return self.respond(evt, params)
        raise missing("event", event_id)
