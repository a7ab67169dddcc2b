"""Billing Meters of the Stripe test double: ``billing.meter`` (create, list, retrieve),
``POST /v1/billing/meter_events`` validated as Stripe does, and
``GET /v1/billing/meters/{id}/event_summaries``, in Stripe's shapes (``billing.meter``,
``billing.meter_event``, ``billing.meter_event_summary``).

A meter event is checked when it arrives: an active meter with its ``event_name``, the
customer of ``payload[<customer key>]`` (default ``stripe_customer_id``) an existing one, an
integer ``payload[<value key>]`` (default ``value``), an ``identifier`` not seen in the last
24 hours (Stripe's duplicate answer: 400 ``invalid_request_error``, "An event already exists
with identifier …"), a ``timestamp`` within the past 35 days and at most 5 minutes ahead, all
on the double's clock. Accepted events are kept per customer (``GET /_double/meter_events``);
the invoice a renewal makes prices them (:mod:`~gateway.demo.stripe_double.invoicing`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.demo.stripe_double import objects
from gateway.demo.stripe_double.form import (
    ApiError,
    Params,
    missing,
    missing_param,
    one_of,
    param_dict,
    param_int,
    param_required,
    param_str,
    read_params,
)
from gateway.demo.stripe_double.objects import Obj

if TYPE_CHECKING:
    from gateway.demo.stripe_double.api import StripeApi

__all__ = [
    "DEMO_METERED_PRICE",
    "DEMO_METER_ID",
    "DUPLICATE_MESSAGE",
    "FORMULAS",
    "IDENTIFIER_WINDOW",
    "MAX_FUTURE",
    "MAX_PAST",
    "DoubleMeters",
]

#: Stripe keeps a meter event's identifier unique for (at least) this long.
IDENTIFIER_WINDOW = 86_400
#: A meter event's timestamp: within the past 35 days, at most 5 minutes ahead.
MAX_PAST = 35 * 86_400
MAX_FUTURE = 300
FORMULAS = ("count", "last", "sum")
DUPLICATE_MESSAGE = "An event already exists with identifier {}."
_WINDOWS = {"hour": 3600, "day": 86_400}

#: The demo's meter (event_name ``analysis``) and Pro's overage price on it: the first 500
#: analyses of a period are included (0), every one after costs $0.10, graduated.
DEMO_METER_ID = "mtr_demo_analysis"
DEMO_METERED_PRICE: Obj = {
    "id": "price_demo_analysis",
    "currency": "usd",
    "nickname": "Analyses over 500",
    "product": "prod_demo",
    "product_name": "PatentLLM Pro",
    "billing_scheme": "tiered",
    "tiers_mode": "graduated",
    "recurring": {"interval": "month", "usage_type": "metered", "meter": DEMO_METER_ID},
    "tiers": [
        {"up_to": 500, "unit_amount": 0},
        {"up_to": "inf", "unit_amount": 10},
    ],
}

Now = Callable[[], int]


def _aligned(ts: int, step: int, name: str) -> None:
    if ts % step:
        unit = {60: "minute", 3600: "hour", 86_400: "day"}[step]
        raise ApiError(400, f"{name} must be aligned with {unit} boundaries.", param=name)


def _status(params: Params, name: str) -> str | None:
    """A meters listing's ``status`` filter: ``active``, ``inactive`` or not given."""
    status = param_str(params, name)
    return None if status is None else one_of(status, ("active", "inactive"), name)


class DoubleMeters:
    """Meters and meter events of one double (see the module docstring)."""

    def __init__(self, customers: Mapping[str, Obj], now: Now) -> None:
        self._customers = customers
        self._now = now
        #: meter id → ``billing.meter``
        self.meters: dict[str, Obj] = {}
        #: every accepted ``billing.meter_event``, in arrival order
        self.events: list[Obj] = []
        #: identifier → when (double's clock) it was last accepted
        self._identifiers: dict[str, int] = {}

    # --- operations ------------------------------------------------------------------------

    def create_meter(self, params: Params, meter_id: str | None = None) -> Obj:
        """An active ``billing.meter`` from the API's parameters, validated as Stripe does
        (``formula`` one of :data:`FORMULAS`, one active meter per ``event_name``)."""
        formula = param_str(param_dict(params, "default_aggregation") or {}, "formula")
        if not formula:
            raise missing_param("default_aggregation[formula]")
        customer_key = param_str(param_dict(params, "customer_mapping") or {}, "event_payload_key")
        value_key = param_str(param_dict(params, "value_settings") or {}, "event_payload_key")
        window = param_str(params, "event_time_window")
        if window is not None:
            one_of(window, tuple(_WINDOWS), "event_time_window")
        display_name = param_required(params, "display_name")
        event_name = param_required(params, "event_name")
        one_of(formula, FORMULAS, "default_aggregation[formula]")
        if self.active_meter(event_name) is not None:
            raise ApiError(
                400,
                f"A meter with event_name {event_name} already exists.",
                param="event_name",
            )
        created = self._now()
        obj: Obj = {
            "id": meter_id or objects.new_id("mtr_test_", 32),
            "object": "billing.meter",
            "created": created,
            "customer_mapping": {
                "event_payload_key": customer_key or "stripe_customer_id",
                "type": "by_id",
            },
            "default_aggregation": {"formula": formula},
            "display_name": display_name,
            "event_name": event_name,
            "event_time_window": window,
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": created,
            "value_settings": {"event_payload_key": value_key or "value"},
        }
        self.meters[obj["id"]] = obj
        return obj

    def active_meter(self, event_name: str) -> Obj | None:
        for obj in self.meters.values():
            if obj["event_name"] == event_name and obj["status"] == "active":
                return obj
        return None

    def seed(self, add_price: Callable[[Obj], Obj]) -> Obj:
        """The demo's meter (:data:`DEMO_METER_ID`, event_name ``analysis``) and Pro's
        metered overage price (:data:`DEMO_METERED_PRICE`, added with ``add_price``)."""
        if DEMO_METER_ID not in self.meters:
            demo = {
                "display_name": "LLM analyses",
                "event_name": "analysis",
                "default_aggregation": {"formula": "sum"},
            }
            self.create_meter(demo, DEMO_METER_ID)
        return add_price(DEMO_METERED_PRICE)

    def get_meter(self, meter_id: str) -> Obj:
        if meter_id not in self.meters:
            raise missing("billing.meter", meter_id)
        return self.meters[meter_id]

    def record_event(self, params: Params) -> Obj:
        """A meter event from the API's parameters, validated as Stripe does."""
        now = self._now()
        event_name = param_required(params, "event_name")
        found = self.active_meter(event_name)
        if found is None:
            raise ApiError(
                400,
                f"No active meter found for event_name {event_name}.",
                param="event_name",
            )
        payload = param_dict(params, "payload")
        if not payload:
            raise missing_param("payload")
        customer_key = found["customer_mapping"]["event_payload_key"]
        value_key = found["value_settings"]["event_payload_key"]
        customer_id = param_str(payload, customer_key)
        if not customer_id:
            raise missing_param(f"payload[{customer_key}]")
        if customer_id not in self._customers:
            raise missing("customer", customer_id, param=f"payload[{customer_key}]", status=400)
        raw = param_str(payload, value_key)
        if raw is None and found["default_aggregation"]["formula"] != "count":
            raise missing_param(f"payload[{value_key}]")
        try:
            value = int(raw) if raw is not None else 1
        except ValueError:
            raise ApiError(
                400,
                f"Invalid integer: payload[{value_key}] must be a whole number.",
                code="parameter_invalid_integer",
                param=f"payload[{value_key}]",
            ) from None
        timestamp = param_int(params, "timestamp", now)
        assert timestamp is not None
        if timestamp < now - MAX_PAST:
            raise ApiError(
                400,
                "Timestamp must be within the past 35 calendar days.",
                code="timestamp_too_far_in_past",
                param="timestamp",
            )
        if timestamp > now + MAX_FUTURE:
            raise ApiError(
                400,
                "Timestamp must be no more than 5 minutes in the future.",
                code="timestamp_in_future",
                param="timestamp",
            )
        identifier = param_str(params, "identifier") or objects.new_id("mev_", 24)
        if len(identifier) > 100:
            raise ApiError(400, "identifier must be at most 100 characters.", param="identifier")
        seen = self._identifiers.get(identifier)
        if seen is not None and now - seen < IDENTIFIER_WINDOW:
            raise ApiError(400, DUPLICATE_MESSAGE.format(identifier))
        self._identifiers[identifier] = now
        event: Obj = {
            "object": "billing.meter_event",
            "created": now,
            "event_name": event_name,
            "identifier": identifier,
            "livemode": False,
            "payload": {str(k): str(v) for k, v in payload.items()},
            "timestamp": timestamp,
            # Not part of Stripe's object: what the double bills from (stripped when shown).
            "_meter": found["id"],
            "_customer": customer_id,
            "_value": value,
        }
        self.events.append(event)
        return event

    def aggregate(self, meter_id: str, customer_id: str, start: int, end: int) -> int:
        """The meter's aggregated value for the customer over ``[start, end)``."""
        formula = self.get_meter(meter_id)["default_aggregation"]["formula"]
        values = [
            int(e["_value"])
            for e in self.events
            if e["_meter"] == meter_id
            and e["_customer"] == customer_id
            and start <= e["timestamp"] < end
        ]
        if formula == "count":
            return len(values)
        if formula == "last":
            return values[-1] if values else 0
        return sum(values)

    def summaries(self, meter_id: str, params: Params) -> list[Obj]:
        """``billing.meter_event_summary`` objects for ``customer``, ``start_time``,
        ``end_time`` and an optional ``value_grouping_window`` (hour, day), newest first."""
        self.get_meter(meter_id)
        customer_id = param_required(params, "customer")
        if customer_id not in self._customers:
            raise missing("customer", customer_id, param="customer", status=400)
        start, end = param_int(params, "start_time"), param_int(params, "end_time")
        for value, name in ((start, "start_time"), (end, "end_time")):
            if value is None:
                raise missing_param(name)
        assert start is not None and end is not None
        if end <= start:
            raise ApiError(400, "end_time must be after start_time.", param="end_time")
        window = param_str(params, "value_grouping_window")
        step = end - start
        for ts, name in ((start, "start_time"), (end, "end_time")):
            _aligned(ts, 60, name)
        if window is not None:
            one_of(window, tuple(_WINDOWS), "value_grouping_window")
            step = _WINDOWS[window]
            for ts, name in ((start, "start_time"), (end, "end_time")):
                _aligned(ts, step, name)
        result = []
        for lo in range(start, end, step):
            hi = min(lo + step, end)
            result.append(
                {
                    "id": f"mtrusg_{meter_id[-8:]}{customer_id[-6:]}{lo}",
                    "object": "billing.meter_event_summary",
                    "aggregated_value": self.aggregate(meter_id, customer_id, lo, hi),
                    "end_time": hi,
                    "livemode": False,
                    "meter": meter_id,
                    "start_time": lo,
                }
            )
        return list(reversed(result))

    def customer_events(self, customer_id: str | None) -> list[Obj]:
        """The accepted events (of one customer), in Stripe's shape."""
        return [
            {k: v for k, v in e.items() if not k.startswith("_")}
            for e in self.events
            if customer_id is None or e["_customer"] == customer_id
        ]

    # --- HTTP ------------------------------------------------------------------------------

    def routes(self, api: StripeApi) -> list[web.RouteDef]:
        """The ``/v1/billing`` routes, answering through the double's ``api``, and
        ``GET /_double/meter_events``."""

        async def create_meter(request: web.Request) -> web.Response:
            params = await read_params(request)
            return api.respond(self.create_meter(params), params)

        async def create_event(request: web.Request) -> web.Response:
            params = await read_params(request)
            event = self.record_event(params)
            return api.respond({k: v for k, v in event.items() if not k.startswith("_")}, params)

        async def event_summaries(request: web.Request) -> web.Response:
            params = await read_params(request)
            meter_id = request.match_info["id"]
            items = self.summaries(meter_id, params)
            return api.listing(items, params, f"/v1/billing/meters/{meter_id}/event_summaries")

        async def control_events(request: web.Request) -> web.Response:
            return web.json_response(
                {"data": self.customer_events(request.query.get("customer") or None)}
            )

        return [
            web.post("/v1/billing/meters", create_meter),
            api.listing_route("/v1/billing/meters", lambda _double: self.meters, status=_status),
            api.retrieve_route("/v1/billing/meters/{id}", lambda _double, i: self.get_meter(i)),
            web.post("/v1/billing/meter_events", create_event),
            web.get("/v1/billing/meters/{id}/event_summaries", event_summaries),
            web.get("/_double/meter_events", control_events),
        ]
