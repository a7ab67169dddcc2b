"""The Stripe double refuses the parameters real Stripe would refuse: every ``/v1`` request is
checked against stripe-python's own typed parameters (the ``…CreateParams`` / ``…ListParams``
TypedDicts the library ships, generated from Stripe's OpenAPI spec), top-level and nested, so a
parameter the gate invents fails its tests instead of failing in production.

:data:`ENDPOINTS` maps each ``/v1`` route of the double (method, route) to its TypedDict;
:class:`ParamsCheck` is the middleware: an unknown parameter answers Stripe's own
``parameter_unknown`` error (400 ``invalid_request_error``, ``param`` the full bracketed path,
"Received unknown parameter: …"). A route missing from the table is refused too (500), so a
new endpoint cannot skip the check. Request options of the library (``api_key``,
``idempotency_key``…, never sent as parameters) are not parameters.
"""

from __future__ import annotations

import functools
import re
import sys
import typing
from typing import Any

from aiohttp import web
from stripe import params as stripe_params
from stripe.params import billing, billing_portal, checkout, entitlements
from typing_extensions import is_typeddict

from gateway.demo.stripe_double.form import ApiError, Params
from gateway.demo.stripe_double.guard import Handler

__all__ = ["ENDPOINTS", "ParamsCheck", "allowed_keys", "unknown_parameter"]

#: (method, route) → stripe-python's params TypedDict for it.
ENDPOINTS: dict[tuple[str, str], type] = {
    ("POST", "/v1/customers"): stripe_params.CustomerCreateParams,
    ("GET", "/v1/customers"): stripe_params.CustomerListParams,
    ("GET", "/v1/customers/{id}"): stripe_params.CustomerRetrieveParams,
    ("POST", "/v1/customers/{id}"): stripe_params.CustomerUpdateParams,
    ("DELETE", "/v1/customers/{id}"): stripe_params.CustomerDeleteParams,
    ("GET", "/v1/prices"): stripe_params.PriceListParams,
    ("GET", "/v1/prices/{id}"): stripe_params.PriceRetrieveParams,
    ("GET", "/v1/plans/{id}"): stripe_params.PlanRetrieveParams,
    ("GET", "/v1/products"): stripe_params.ProductListParams,
    ("GET", "/v1/products/{id}"): stripe_params.ProductRetrieveParams,
    ("GET", "/v1/products/{id}/features"): stripe_params.ProductFeatureListParams,
    ("POST", "/v1/subscriptions"): stripe_params.SubscriptionCreateParams,
    ("GET", "/v1/subscriptions"): stripe_params.SubscriptionListParams,
    ("GET", "/v1/subscriptions/{id}"): stripe_params.SubscriptionRetrieveParams,
    ("POST", "/v1/subscriptions/{id}"): stripe_params.SubscriptionUpdateParams,
    ("DELETE", "/v1/subscriptions/{id}"): stripe_params.SubscriptionCancelParams,
    ("POST", "/v1/checkout/sessions"): checkout.SessionCreateParams,
    ("GET", "/v1/checkout/sessions"): checkout.SessionListParams,
    ("GET", "/v1/checkout/sessions/{id}"): checkout.SessionRetrieveParams,
    ("POST", "/v1/billing_portal/sessions"): billing_portal.SessionCreateParams,
    ("GET", "/v1/promotion_codes"): stripe_params.PromotionCodeListParams,
    ("GET", "/v1/promotion_codes/{id}"): stripe_params.PromotionCodeRetrieveParams,
    ("GET", "/v1/coupons/{id}"): stripe_params.CouponRetrieveParams,
    ("GET", "/v1/events"): stripe_params.EventListParams,
    ("GET", "/v1/events/{id}"): stripe_params.EventRetrieveParams,
    ("GET", "/v1/invoices"): stripe_params.InvoiceListParams,
    ("GET", "/v1/invoices/{id}"): stripe_params.InvoiceRetrieveParams,
    ("POST", "/v1/invoices/create_preview"): stripe_params.InvoiceCreatePreviewParams,
    ("GET", "/v1/entitlements/active_entitlements"): entitlements.ActiveEntitlementListParams,
    ("GET", "/v1/entitlements/features"): entitlements.FeatureListParams,
    ("POST", "/v1/billing/meters"): billing.MeterCreateParams,
    ("GET", "/v1/billing/meters"): billing.MeterListParams,
    ("GET", "/v1/billing/meters/{id}"): billing.MeterRetrieveParams,
    ("POST", "/v1/billing/meter_events"): billing.MeterEventCreateParams,
    ("GET", "/v1/billing/meters/{id}/event_summaries"): billing.MeterEventSummaryListParams,
}

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FREE_FORM = ("Dict", "dict", "Mapping")


@functools.cache
def _request_options() -> frozenset[str]:
    from stripe._request_options import RequestOptions

    return frozenset(RequestOptions.__annotations__)


def _names(annotation: Any) -> list[str]:
    """The identifiers an annotation names (typing objects, ForwardRefs and strings alike)."""
    if isinstance(annotation, str):
        return _NAME_RE.findall(annotation)
    if isinstance(annotation, typing.ForwardRef):
        return _NAME_RE.findall(annotation.__forward_arg__)
    names: list[str] = []
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Dict, typing.Mapping):  # noqa: UP006 - as the library spells them
        names.append("Dict")
    for arg in typing.get_args(annotation):
        names.extend(_names(arg))
    if isinstance(annotation, type):
        names.append(annotation.__name__)
    return names


def _nested(owner: type, annotation: Any) -> tuple[type, ...]:
    """The TypedDicts a field's value may be (its hashes, or a list of them); none for
    free-form hashes (``metadata``: ``Dict[str, str]``) and scalars."""
    names = _names(annotation)
    if any(name in _FREE_FORM for name in names[:3]):
        return ()
    scope = vars(sys.modules[owner.__module__])
    found = []
    for name in names:
        candidate = scope.get(name)
        if isinstance(candidate, type) and is_typeddict(candidate):
            found.append(candidate)
    return tuple(found)


@functools.cache
def allowed_keys(cls: type) -> dict[str, tuple[type, ...]]:
    """The parameters of ``cls`` → the TypedDicts their values may be (request options
    excluded at the top level; they are never parameters)."""
    options = _request_options()
    return {
        key: _nested(cls, annotation)
        for key, annotation in cls.__annotations__.items()
        if key not in options
    }


def unknown_parameter(params: Any, classes: tuple[type, ...], path: str = "") -> str | None:
    """The full path (``line_items[0][foo]``) of the first parameter none of ``classes``
    declares, or None."""
    if isinstance(params, list):
        for index, element in enumerate(params):
            found = unknown_parameter(element, classes, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    if not isinstance(params, dict) or not classes:
        return None
    fields: dict[str, tuple[type, ...]] = {}
    for cls in classes:
        for key, nested in allowed_keys(cls).items():
            fields[key] = fields.get(key, ()) + nested
    for key, value in params.items():
        where = f"{path}[{key}]" if path else key
        if key not in fields:
            return where
        found = unknown_parameter(value, fields[key], where)
        if found is not None:
            return found
    return None


class ParamsCheck:
    """The middleware (see the module docstring); ``read_params`` decodes a request's
    parameters as the handlers do."""

    def __init__(self, read_params: typing.Callable[[web.Request], typing.Awaitable[Params]]):
        self._read_params = read_params

    @staticmethod
    def typed_params(request: web.Request) -> type | None:
        """The params TypedDict of the request's route (None: not a mapped ``/v1`` route)."""
        info = request.match_info
        route = info.route if info is not None else None
        resource = route.resource if route is not None else None
        if resource is None:
            return None
        return ENDPOINTS.get((request.method, resource.canonical))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/") or isinstance(
            request.match_info.http_exception, web.HTTPException
        ):
            return await handler(request)  # not the API, or no such route (the guard's 404)
        cls = self.typed_params(request)
        if cls is None:
            raise ApiError(
                500, f"The double has no typed parameters for {request.method} {request.path}."
            )
        params = await self._read_params(request)
        unknown = unknown_parameter(params, (cls,))
        if unknown is not None:
            raise ApiError(
                400,
                f"Received unknown parameter: {unknown}",
                code="parameter_unknown",
                param=unknown,
            )
        return await handler(request)
