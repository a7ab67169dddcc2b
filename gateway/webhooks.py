"""Stripe webhooks: keep the entitlement cache true.

One request, in order:

1. read the raw body (at most :data:`MAX_BODY` bytes → 413);
2. verify it with :func:`gateway.stripe_webhooks.verify_webhook` against each
   ``STRIPE_WEBHOOK_SECRET`` (several during a rotation) → 400 ``invalid_signature``, nothing
   written;
3. ignore types we do not handle → 200 (Stripe must never retry what we ignore);
4. skip events already processed (dedupe by event id) → 200 ``duplicate``;
5. process: :meth:`Entitlements.apply_event <gateway.entitlement.Entitlements.apply_event>`
   re-reads the customer's subscriptions (and, with ``FEATURE_RULES``, the features of the
   accepted ones: ``entitlements.active_entitlement_summary.updated`` is handled like the
   subscription events) from Stripe (so delivery order does not matter); while Stripe is
   unreachable it applies a ``customer.subscription.*`` event's own object under its outage
   policy (:mod:`gateway.entitlement.events`), or says the payload cannot be ordered → 503
   ``stale_event_retry`` (the retry after the outage re-reads Stripe); any other event answers
   503 so Stripe retries;
6. record the event id — only now, so an event whose processing failed is processed again
   when Stripe retries it.

Every change of customers and entitlements goes through :class:`~gateway.entitlement.Entitlements`
(which drops the cached state it replaces); the store is used here only for event ids.
Processing is idempotent (a re-read, or "apply if newer"), so two concurrent deliveries of one
event are harmless. One log line per event: type, id, customer, outcome — never the payload.
"""

import logging
from typing import Any

from aiohttp import web

from gateway.emails import valid_email
from gateway.entitlement import Entitlements, StaleEvent
from gateway.logs import log_event
from gateway.settings import Settings
from gateway.store import Store, StoreError
from gateway.stripe_api import (
    StripeRejected,
    StripeUnavailable,
)
from gateway.stripe_webhooks import WebhookMalformed, WebhookSignatureInvalid, verify_webhook

__all__ = ["HANDLED_TYPES", "MAX_BODY", "checkout_email", "customer_of", "handle_webhook"]

log = logging.getLogger(__name__)

#: Stripe's events are a few KB; anything near this is not a Stripe event.
MAX_BODY = 1024 * 1024

SUBSCRIPTION_PREFIX = "customer.subscription."
HANDLED_TYPES: frozenset[str] = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.pending_update_applied",
        "customer.subscription.pending_update_expired",
        "customer.subscription.trial_will_end",
        "invoice.paid",
        "invoice.payment_failed",
        "customer.deleted",
        # the customer's features changed; refreshed like the above
        "entitlements.active_entitlement_summary.updated",
    }
)


class _BodyTooLarge(Exception):
    pass


def _json(status: int, key: str, value: str) -> web.Response:
    return web.json_response({key: value}, status=status)


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _customer_id(value: object) -> str | None:
    """A customer reference: an id, or an expanded customer object."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        return _customer_id(value.get("id"))
    return None


def customer_of(event_type: str, obj: dict[str, Any]) -> str | None:
    """The Stripe customer an event is about."""
    if event_type == "customer.deleted":
        return _customer_id(obj.get("id"))
    return _customer_id(obj.get("customer"))


def checkout_email(session: dict[str, Any]) -> str | None:
    """The email a Checkout Session was paid with (``customer_details``, else the prefill)."""
    details = session.get("customer_details")
    email = details.get("email") if isinstance(details, dict) else None
    return valid_email(email or session.get("customer_email"), source="webhook_checkout")


async def handle_webhook(
    request: web.Request, *, settings: Settings, store: Store, entitlements: Entitlements
) -> web.Response:
    """``POST {GATE_PREFIX}/webhooks/stripe``: verify, dedupe, process, record (see module)."""
    try:
        raw = await _read_body(request)
    except _BodyTooLarge:
        log_event(log, "webhook", level=logging.WARNING, outcome="too_large", limit=MAX_BODY)
        return _json(413, "error", "payload_too_large")
    if not settings.stripe_webhook_secret:
        # A configuration error, not the sender's: 503 so Stripe keeps the event and delivers
        # it again once the secret is set.
        log_event(
            log,
            "webhook",
            level=logging.ERROR,
            outcome="not_configured",
            reason="STRIPE_WEBHOOK_SECRET unset",
        )
        return _json(503, "error", "webhooks_not_configured")
    try:
        event = verify_webhook(
            raw, request.headers.get("Stripe-Signature"), settings.stripe_webhook_secret
        )
    except WebhookMalformed as exc:
        log_event(log, "webhook", level=logging.WARNING, outcome="malformed", reason=str(exc))
        return _json(400, "error", "malformed")
    except WebhookSignatureInvalid:
        log_event(log, "webhook", level=logging.WARNING, outcome="invalid_signature")
        return _json(400, "error", "invalid_signature")

    event_id: str = event["id"]
    event_type: str = event["type"]
    created: int = event["created"]
    obj: dict[str, Any] = event["data"]["object"]
    customer_id = customer_of(event_type, obj)

    def done(
        outcome: str, status: int = 200, level: int = logging.INFO, detail: str = ""
    ) -> web.Response:
        fields: dict[str, object] = {"detail": detail} if detail else {}
        log_event(
            log,
            "webhook",
            level=level,
            type=event_type,
            id=event_id,
            customer=customer_id or "-",
            outcome=outcome,
            **fields,
        )
        return _json(status, "error" if status >= 400 else "status", outcome)

    if event_type not in HANDLED_TYPES:
        return done("ignored")
    try:
        if await store.has_event(event_id):
            return done("duplicate")
        if customer_id is None:
            # E.g. a guest Checkout without a customer: nothing to sync.
            outcome = "no_customer"
        else:
            outcome = await _process(event_type, created, obj, customer_id, entitlements)
        if not await store.record_event(event_id, event_type, created):
            # Another delivery of the same event got here first; harmless (idempotent).
            outcome = "duplicate"
    except StaleEvent:
        return done("stale_event_retry", 503, logging.WARNING)
    except StripeUnavailable as exc:
        return done("stripe_unavailable", 503, logging.WARNING, str(exc))
    except StripeRejected as exc:
        # A bad key or missing permissions (a vanished customer is not an error: it simply
        # has no subscription). Stripe retries, and succeeds once the operator fixes it.
        return done("stripe_rejected", 500, logging.ERROR, str(exc))
    except StoreError as exc:
        return done("store_unavailable", 503, logging.ERROR, str(exc))
    return done(outcome)


async def _process(
    event_type: str, created: int, obj: dict[str, Any], customer_id: str, entitlements: Entitlements
) -> str:
    """Hand one verified, handled event to the entitlement cache. Returns the outcome."""
    if event_type == "customer.deleted":
        await entitlements.delete_customer(customer_id)
        return "forgotten"
    if event_type == "checkout.session.completed":
        email = checkout_email(obj)
        if email:
            await entitlements.link_customer(customer_id, email)
    # A subscription event carries the subscription's state: applied while Stripe is down.
    subscription = obj.get("object") == "subscription" and event_type.startswith(
        SUBSCRIPTION_PREFIX
    )
    return await entitlements.apply_event(customer_id, created, obj if subscription else None)
