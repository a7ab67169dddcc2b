"""The Stripe test double: :class:`StripeDouble`, its async methods for tests and demos (each
delivers the webhooks its change caused before it returns) and the aiohttp app serving it.

The layers below: :mod:`~gateway.demo.stripe_double.state` (tables, clock, lookups, events),
:mod:`~gateway.demo.stripe_double.subscriptions` (what Stripe does to customers and
subscriptions), :mod:`~gateway.demo.stripe_double.sessions` (Checkout and the portal); the app:
:mod:`~gateway.demo.stripe_double.guard` (faults, API key, idempotency) in front of
:mod:`~gateway.demo.stripe_double.api` (``/v1``), the hosted pages
(:mod:`~gateway.demo.stripe_double.pages`) and the ``/_double`` controls
(:mod:`~gateway.demo.stripe_double.controls`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from aiohttp import web

from gateway.demo.stripe_double import objects, sessions
from gateway.demo.stripe_double.api import StripeApi
from gateway.demo.stripe_double.controls import Controls
from gateway.demo.stripe_double.form import missing, read_params
from gateway.demo.stripe_double.guard import ApiGuard
from gateway.demo.stripe_double.objects import SUBSCRIPTION_STATUSES, Obj
from gateway.demo.stripe_double.pages import CheckoutPages, PortalPages
from gateway.demo.stripe_double.params_check import ParamsCheck
from gateway.demo.stripe_double.subscriptions import SubscriptionLifecycle

__all__ = ["StripeDouble"]


class StripeDouble(SubscriptionLifecycle):
    """A local Stripe: its state and operations, and ``app`` serving them (see the package
    docstring)."""

    # --- async public API (delivers the events before returning) ------------------------------

    async def advance_time(self, seconds: int) -> None:
        """Move the clock; renew or end subscriptions whose period ended (with events)."""
        self._offset += seconds
        out: list[Obj] = []
        self.run_clock(out)
        await self.webhooks.deliver(out)

    async def set_status(self, subscription_id: str, status: str, **fields: Any) -> dict[str, Any]:
        """Force a subscription's status (and top-level ``fields``) as Stripe's own machinery
        would; emits ``customer.subscription.updated`` (``.deleted`` for ``canceled``)."""
        sub = self.get_subscription(subscription_id)
        if status not in SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        unknown = set(fields) - set(sub)
        if unknown:
            raise KeyError(f"not subscription fields: {sorted(unknown)}")
        if fields.get("cancel_at_period_end") and "cancel_at" not in fields:
            fields["cancel_at"] = self.period(sub)[1]
        out: list[Obj] = []
        previous = {k: copy.deepcopy(sub[k]) for k in fields if sub[k] != fields[k]}
        sub.update(copy.deepcopy(fields))
        if status == "canceled" and sub["status"] != "canceled":
            self.cancel_subscription_now(sub, out)
        elif status != sub["status"] or previous:
            if status != sub["status"]:
                previous["status"] = sub["status"]
            sub["status"] = status
            if status == "incomplete_expired":
                sub["ended_at"] = self.now()
            self.record("customer.subscription.updated", sub, out, previous)
        await self.webhooks.deliver(out)
        return sub

    async def emit(
        self,
        event_type: str,
        obj: dict[str, Any],
        *,
        previous_attributes: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record an Event for ``obj`` (listable) and deliver it to ``webhook_urls``."""
        out: list[Obj] = []
        evt = self.record(event_type, obj, out, previous_attributes)
        await self.webhooks.deliver(out)
        return evt

    async def complete_checkout(
        self,
        session_id: str,
        email: str | None = None,
        *,
        promotion_code: str | None = None,
        with_card: bool = True,
    ) -> dict[str, Any]:
        """Pay an open Checkout Session as the hosted page's Pay button does (with a
        ``promotion_code`` typed in; ``with_card=False``: a trial started without a card)."""
        if session_id not in self.checkout_sessions:
            raise missing("checkout.session", session_id)
        out: list[Obj] = []
        session = sessions.complete_checkout(
            self,
            self.checkout_sessions[session_id],
            email,
            out,
            promotion_code=promotion_code,
            with_card=with_card,
        )
        await self.webhooks.deliver(out)
        return session

    async def update_payment_method(self, customer_id: str) -> str:
        """What the portal's "update payment method" screen does: a new default card for the
        customer, then the open invoices of its past-due subscriptions are paid with it (their
        status becomes ``active``). Returns the new payment method's id."""
        cust = self.get_customer(customer_id)
        out: list[Obj] = []
        pm_id = objects.new_id("pm_")
        settings = cust.setdefault("invoice_settings", {})
        previous = {"invoice_settings": copy.deepcopy(settings)}
        settings["default_payment_method"] = pm_id
        self.record("customer.updated", cust, out, previous)
        for sub in self.customer_subscriptions(customer_id):
            invoice = self.invoices.get(sub["latest_invoice"] or "")
            if sub["status"] not in ("past_due", "unpaid") or not invoice:
                continue
            if invoice["status"] == "open":
                invoice.update(
                    {
                        "status": "paid",
                        "amount_paid": invoice["amount_due"],
                        "amount_remaining": 0,
                    }
                )
                invoice["status_transitions"]["paid_at"] = self.now()
                self.record("invoice.paid", invoice, out)
            before = {"status": sub["status"]}
            sub["status"] = "active"
            self.record("customer.subscription.updated", sub, out, before)
        await self.webhooks.deliver(out)
        return pm_id

    async def update_subscription(
        self, subscription_id: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        """Apply Stripe update parameters (form-style strings) and deliver the event."""
        out: list[Obj] = []
        sub = self.update_subscription_now(self.get_subscription(subscription_id), params, out)
        await self.webhooks.deliver(out)
        return sub

    async def cancel_subscription(self, subscription_id: str) -> dict[str, Any]:
        out: list[Obj] = []
        sub = self.cancel_subscription_now(self.get_subscription(subscription_id), out)
        await self.webhooks.deliver(out)
        return sub

    # --- webhooks ------------------------------------------------------------------------------

    async def wait_deliveries(self) -> None:
        """Wait until background webhook deliveries (from API calls) are done."""
        await self.webhooks.wait()

    def sign(self, payload: str, timestamp: int | None = None) -> str:
        """A ``Stripe-Signature`` header for ``payload`` (real time by default)."""
        return self.webhooks.sign(payload, timestamp)

    # --- the app -------------------------------------------------------------------------------

    @functools.cached_property
    def app(self) -> web.Application:
        """The app serving this double (built on first use; :meth:`make_app` builds another)."""
        return self.make_app()

    def make_app(self) -> web.Application:
        """A fresh app serving this double."""
        guard = ApiGuard(self)
        check = ParamsCheck(read_params)  # inside the guard: its errors answer as Stripe's
        app = web.Application(middlewares=[guard.middleware, check.middleware])
        app.cleanup_ctx.append(self.webhooks.client_session_ctx)
        api = StripeApi(self)
        for handlers in (api, CheckoutPages(self), PortalPages(self), Controls(self)):
            app.router.add_routes(handlers.routes())
        app.router.add_routes(self.entitlements.routes(api))
        app.router.add_routes(self.meters.routes(api))
        return app
