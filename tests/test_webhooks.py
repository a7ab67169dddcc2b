"""Webhooks end to end on 127.0.0.1: the Stripe double signs and delivers (or we sign with
stripe's own helper), a small app serves ``handle_webhook``, and the real SQLiteStore and
Entitlements read the double through the real StripeClientAPI."""

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import rules
from gateway.demo.stripe_double import StripeDouble, objects
from gateway.entitlement import Entitlements
from gateway.model import Identity
from gateway.settings import Settings
from gateway.store import SQLiteStore
from gateway.stripe_client import StripeClientAPI
from gateway.webhooks import HANDLED_TYPES, MAX_BODY, handle_webhook
from tests.conftest import changed, make_settings

ROUTE = "/_gate/webhooks/stripe"
OLD_SECRET = "whsec_old_rotated_out"
DOUBLE_SECRET = "whsec_double"
PRICE = "price_demo_monthly"

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclasses.dataclass
class Env:
    double: StripeDouble
    settings: Settings
    store: SQLiteStore
    entitlements: Entitlements
    url: str
    http: aiohttp.ClientSession
    serve: Callable[[Settings], Awaitable[str]]

    def stripe_reads(self) -> int:
        return sum(1 for _, path in self.double.calls if path == "/v1/subscriptions")

    async def post(
        self,
        body: str | bytes,
        signature: str | None,
        url: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        async with self.http.post(url or self.url, data=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def send(
        self, event: dict[str, Any], secret: str = DOUBLE_SECRET
    ) -> tuple[int, dict[str, Any]]:
        payload = json.dumps(event)
        return await self.post(payload, sign(payload, secret))


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    header: str = stripe.WebhookSignature.generate_signature_header(
        payload, secret, timestamp=timestamp
    )
    return header


def make_event(event_type: str, obj: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    created = int(time.time()) if created is None else created
    return objects.event(event_type, obj, created=created, pending_webhooks=1)


def webhook_app(
    settings: Settings, store: SQLiteStore, entitlements: Entitlements
) -> web.Application:
    async def route(request: web.Request) -> web.Response:
        return await handle_webhook(
            request, settings=settings, store=store, entitlements=entitlements
        )

    app = web.Application()
    app.router.add_post(ROUTE, route)
    return app


@pytest.fixture
async def env(aiohttp_server: ServerFactory, tmp_path: Path) -> AsyncIterator[Env]:
    double = StripeDouble()
    double_server = await aiohttp_server(double.app)
    settings = make_settings(
        billing_mode="on",
        session_secret="w" * 32,
        public_url="http://127.0.0.1",  # required with billing on (Host-header poisoning)
        stripe_secret_key=double.api_key,
        stripe_api_base=str(double_server.make_url("")).rstrip("/"),
        stripe_webhook_secret=(OLD_SECRET, DOUBLE_SECRET),
        stripe_price_ids=(PRICE,),
        stripe_max_retries=0,
        stripe_timeout=5.0,
        database_path=str(tmp_path / "gate.sqlite3"),
    )
    store = SQLiteStore(settings.database_path)
    await store.open()
    api = await StripeClientAPI.create(settings)
    entitlements = Entitlements(settings, store, api)

    async def serve(variant: Settings) -> str:
        server = await aiohttp_server(webhook_app(variant, store, entitlements))
        return str(server.make_url(ROUTE))

    url = await serve(settings)
    double.webhook_urls = [url]
    try:
        async with aiohttp.ClientSession() as http:
            yield Env(double, settings, store, entitlements, url, http, serve)
    finally:
        await entitlements.close()
        await api.close()
        await store.close()


def paying_customer(double: StripeDouble, email: str = "payer@example.com") -> tuple[str, str]:
    customer = double.create_customer(email)
    sub = double.create_subscription(customer["id"], PRICE, status="active")
    return customer["id"], sub["id"]


# --- signature ----------------------------------------------------------------------------------


async def test_bad_signatures_are_rejected_and_nothing_is_written(env: Env) -> None:
    cus, sub_id = paying_customer(env.double)
    event = make_event("customer.subscription.updated", env.double.subscriptions[sub_id])
    payload = json.dumps(event)
    good = sign(payload, DOUBLE_SECRET)
    attempts: list[tuple[str | bytes, str | None]] = [
        (payload, None),  # no header
        (payload, ""),
        (payload, "garbage"),
        (payload, sign(payload, "whsec_someone_else")),
        (payload.replace(cus, "cus_evil"), good),  # body changed after signing
        (payload, sign(payload, DOUBLE_SECRET, timestamp=int(time.time()) - 301)),  # replay
        (payload, good.replace("v1=", "v0=")),
    ]
    for body, signature in attempts:
        status, answer = await env.post(body, signature)
        assert (status, answer) == (400, {"error": "invalid_signature"}), signature
    assert not await env.store.has_event(event["id"])
    assert await env.store.get_entitlement(cus) is None
    assert env.stripe_reads() == 0


async def test_rotation_accepts_every_configured_secret(env: Env) -> None:
    _, sub_id = paying_customer(env.double)
    for secret in (OLD_SECRET, DOUBLE_SECRET):
        event = make_event("customer.subscription.updated", env.double.subscriptions[sub_id])
        assert await env.send(event, secret) == (200, {"status": "refreshed"})
        assert await env.store.has_event(event["id"])


async def test_malformed_bodies_are_rejected(env: Env) -> None:
    for body in ("not json", "[]", "null", '{"id": 5}', '{"object": "event", "id": "evt_1"}'):
        status, answer = await env.post(body, sign(body, DOUBLE_SECRET))
        assert (status, answer) == (400, {"error": "malformed"}), body
    raw = b'{"id": "\xff"}'
    status, answer = await env.post(raw, "t=1,v1=00")
    assert status == 400
    assert env.stripe_reads() == 0


async def test_deeply_nested_signed_body_is_rejected_not_a_crash(env: Env) -> None:
    cus, _ = paying_customer(env.double)
    depth = 5000
    nested = "[" * depth + "]" * depth
    event = make_event("invoice.paid", {"id": "in_1", "object": "invoice", "customer": cus})
    payload = json.dumps(event).replace(
        '"object": "invoice"', f'"object": "invoice", "x": {nested}'
    )
    assert nested in payload
    status, answer = await env.post(payload, sign(payload, DOUBLE_SECRET))
    assert (status, answer) == (400, {"error": "malformed"})
    assert not await env.store.has_event(event["id"])


async def test_oversized_body_is_refused(env: Env) -> None:
    body = "x" * (MAX_BODY + 1)
    headers = {"Stripe-Signature": sign(body, DOUBLE_SECRET)}
    async with env.http.post(env.url, data=io.BytesIO(body.encode()), headers=headers) as resp:
        assert resp.status == 413
        assert await resp.json() == {"error": "payload_too_large"}


async def test_oversized_chunked_body_is_refused(env: Env) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536

    async with env.http.post(env.url, data=chunks(), headers={"Stripe-Signature": "t=1"}) as r:
        assert r.status == 413


async def test_without_a_webhook_secret_events_wait_for_configuration(env: Env) -> None:
    url = await env.serve(changed(env.settings, stripe_webhook_secret=()))
    payload = json.dumps(make_event("invoice.paid", {"id": "in_1", "object": "invoice"}))
    status, answer = await env.post(payload, sign(payload, DOUBLE_SECRET), url=url)
    assert (status, answer) == (503, {"error": "webhooks_not_configured"})


# --- processing ---------------------------------------------------------------------------------


async def test_subscription_event_delivered_by_the_double_refreshes_the_entitlement(
    env: Env,
) -> None:
    cus, sub_id = paying_customer(env.double)
    env.entitlements.forget(cus)
    await env.double.set_status(sub_id, "past_due")  # the double signs and delivers
    [(event_id, status)] = env.double.deliveries
    assert status == 200
    ent = await env.store.get_entitlement(cus)
    assert ent is not None
    assert ent.status == "past_due"
    assert ent.source == "webhook"
    assert await env.store.has_event(event_id)
    assert env.stripe_reads() == 1  # re-read from Stripe, not taken from the payload
    lookup = env.entitlements.lookup_cached(Identity(None, cus, "cookie"))
    assert lookup is not None and lookup.entitlement is not None
    assert lookup.entitlement.status == "past_due"


async def test_refresh_reads_stripe_not_the_payload(env: Env) -> None:
    # An old event says "active", Stripe says "canceled": Stripe wins (order does not matter).
    cus, sub_id = paying_customer(env.double)
    stale_copy = dict(env.double.subscriptions[sub_id])
    env.double.subscriptions[sub_id]["status"] = "canceled"
    event = make_event("customer.subscription.updated", stale_copy, created=1_000_000)
    assert await env.send(event) == (200, {"status": "refreshed"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "canceled"


@pytest.mark.parametrize(
    "event_type", ["invoice.paid", "invoice.payment_failed", "customer.subscription.created"]
)
async def test_each_handled_type_refreshes(env: Env, event_type: str) -> None:
    cus, sub_id = paying_customer(env.double)
    obj = (
        env.double.subscriptions[sub_id]
        if event_type.startswith("customer.subscription.")
        else {"id": "in_test", "object": "invoice", "customer": cus, "subscription": sub_id}
    )
    assert await env.send(make_event(event_type, obj)) == (200, {"status": "refreshed"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "active"


async def test_expanded_customer_object_is_understood(env: Env) -> None:
    cus, _ = paying_customer(env.double)
    obj = {"id": "in_x", "object": "invoice", "customer": {"id": cus, "object": "customer"}}
    assert await env.send(make_event("invoice.paid", obj)) == (200, {"status": "refreshed"})
    assert await env.store.get_entitlement(cus) is not None


async def test_duplicate_delivery_is_acknowledged_once(env: Env) -> None:
    _, sub_id = paying_customer(env.double)
    event = make_event("customer.subscription.updated", env.double.subscriptions[sub_id])
    payload = json.dumps(event)
    assert await env.post(payload, sign(payload, DOUBLE_SECRET)) == (200, {"status": "refreshed"})
    assert await env.post(payload, sign(payload, OLD_SECRET)) == (200, {"status": "duplicate"})
    assert env.stripe_reads() == 1


async def test_concurrent_duplicates_are_harmless(env: Env) -> None:
    _, sub_id = paying_customer(env.double)
    event = make_event("customer.subscription.updated", env.double.subscriptions[sub_id])
    results = await asyncio.gather(*(env.send(event) for _ in range(3)))
    assert all(status == 200 for status, _ in results)
    outcomes = sorted(answer["status"] for _, answer in results)
    assert "refreshed" in outcomes and set(outcomes) <= {"refreshed", "duplicate"}
    assert await env.store.has_event(event["id"])


async def test_unhandled_types_are_acknowledged_and_ignored(env: Env) -> None:
    for event_type in ("customer.created", "charge.succeeded", "payment_intent.created"):
        assert event_type not in HANDLED_TYPES
        event = make_event(event_type, {"id": "x_1", "object": "thing", "customer": "cus_1"})
        assert await env.send(event) == (200, {"status": "ignored"})
    assert env.stripe_reads() == 0


async def test_handled_event_without_a_customer(env: Env) -> None:
    session = {"id": "cs_1", "object": "checkout.session", "customer": None, "mode": "payment"}
    event = make_event("checkout.session.completed", session)
    assert await env.send(event) == (200, {"status": "no_customer"})
    assert await env.store.has_event(event["id"])
    assert env.stripe_reads() == 0


# --- Stripe unavailable -------------------------------------------------------------------------


async def test_stripe_down_subscription_event_applied_only_if_newer(env: Env) -> None:
    cus, sub_id = paying_customer(env.double)
    sub = env.double.subscriptions[sub_id]
    first = make_event("customer.subscription.updated", sub)
    assert await env.send(first) == (200, {"status": "refreshed"})
    stored = await env.store.get_entitlement(cus)
    assert stored is not None and stored.status == "active"

    env.double.faults.fail_always(500)
    newer = make_event("customer.subscription.updated", {**sub, "status": "past_due"})
    newer["created"] = stored.event_created + 60
    assert await env.send(newer) == (200, {"status": "applied_from_event"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "past_due" and ent.event_created == newer["created"]
    assert await env.store.has_event(newer["id"])
    # L1 was dropped: a lookup sees the applied state.
    lookup = await env.entitlements.lookup(Identity(None, cus, "cookie"))
    assert lookup.entitlement is not None and lookup.entitlement.status == "past_due"

    older = make_event("customer.subscription.updated", {**sub, "status": "active"})
    older["created"] = stored.event_created - 3600
    # Not applied, and answered 503 so Stripe retries it once it can be re-read.
    assert await env.send(older) == (503, {"error": "stale_event_retry"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "past_due"
    assert not await env.store.has_event(older["id"])


async def test_stripe_down_subscription_deleted_applies_the_cancellation(env: Env) -> None:
    cus, sub_id = paying_customer(env.double)
    env.double.faults.fail_always(503)
    sub = {**env.double.subscriptions[sub_id], "status": "canceled"}
    assert await env.send(make_event("customer.subscription.deleted", sub)) == (
        200,
        {"status": "applied_from_event"},
    )
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "canceled" and ent.source == "webhook_payload"


async def test_stripe_down_event_about_another_subscription_cannot_revoke(env: Env) -> None:
    cus, old_id = paying_customer(env.double)
    env.double.subscriptions[old_id]["status"] = "canceled"
    new = env.double.create_subscription(cus, PRICE, status="active")
    assert await env.send(make_event("customer.subscription.created", new)) == (
        200,
        {"status": "refreshed"},
    )
    stored = await env.store.get_entitlement(cus)
    assert stored is not None and stored.subscription_id == new["id"]

    env.double.faults.fail_always(500)
    # A late event about the old, canceled subscription must not take access away.
    old = make_event("customer.subscription.deleted", env.double.subscriptions[old_id])
    old["created"] = stored.event_created + 60
    assert await env.send(old) == (200, {"status": "other_subscription_kept"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.subscription_id == new["id"] and ent.status == "active"

    # But an event about another subscription that grants access where the stored one does
    # not is applied (e.g. a new subscription while the stored one is canceled).
    third = env.double.create_subscription(cus, PRICE, status="active")
    env.double.subscriptions[new["id"]]["status"] = "canceled"
    canceled = make_event("customer.subscription.deleted", env.double.subscriptions[new["id"]])
    canceled["created"] = stored.event_created + 120
    assert await env.send(canceled) == (200, {"status": "applied_from_event"})
    created = make_event("customer.subscription.created", third)
    created["created"] = stored.event_created + 180
    assert await env.send(created) == (200, {"status": "applied_from_event"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.subscription_id == third["id"] and ent.status == "active"


async def test_stripe_down_same_second_stale_event_cannot_reopen_access(env: Env) -> None:
    # The attack: while Stripe is down, "deleted" (created = T) is followed
    # by a late "updated: active" with the same created = T. It must not be applied: 503, so
    # Stripe retries it after the outage, when the re-read gives the truth.
    cus, sub_id = paying_customer(env.double)
    user = Identity(None, cus, "cookie")
    assert await env.send(make_event("invoice.paid", {"id": "in_1", "customer": cus}))
    stored = await env.store.get_entitlement(cus)
    assert stored is not None and stored.status == "active"
    active_copy = dict(env.double.subscriptions[sub_id])
    env.double.subscriptions[sub_id]["status"] = "canceled"  # the truth from now on

    env.double.faults.fail_always(500)
    t = stored.event_created + 60
    deleted = make_event("customer.subscription.deleted", env.double.subscriptions[sub_id], t)
    assert await env.send(deleted) == (200, {"status": "applied_from_event"})
    late = make_event("customer.subscription.updated", active_copy, t)
    assert await env.send(late) == (503, {"error": "stale_event_retry"})
    assert not await env.store.has_event(late["id"])  # so Stripe's retry is processed
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "canceled"
    lookup = await env.entitlements.lookup(user)
    assert not rules.access(lookup.entitlement, env.settings, env.entitlements.now()).allowed

    # After the outage, Stripe's retry re-reads: still canceled.
    env.double.faults.reset()
    env.entitlements.breaker.success()
    assert await env.send(late) == (200, {"status": "refreshed"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "canceled"
    lookup = await env.entitlements.lookup(user)
    assert not rules.access(lookup.entitlement, env.settings, env.entitlements.now()).allowed


async def test_payload_state_is_re_read_as_soon_as_stripe_answers(env: Env) -> None:
    # A state applied from an event's payload during an outage is not trusted for CACHE_TTL:
    # the next lookup asks Stripe first (falling back to the payload state while it fails).
    cus, sub_id = paying_customer(env.double)
    user = Identity(None, cus, "cookie")
    active_copy = dict(env.double.subscriptions[sub_id])
    env.double.subscriptions[sub_id]["status"] = "canceled"
    env.double.faults.fail_always(500)
    created = make_event("customer.subscription.created", active_copy)
    assert await env.send(created) == (200, {"status": "applied_from_event"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "active" and ent.source == "webhook_payload"

    env.entitlements.forget(cus)  # as after L1_TTL
    reads = env.stripe_reads()
    lookup = await env.entitlements.lookup(user)  # Stripe still down: the payload state
    assert env.stripe_reads() > reads  # ... but Stripe was asked first
    assert lookup.entitlement is not None and lookup.entitlement.status == "active"

    env.double.faults.reset()
    env.entitlements.breaker.success()
    env.entitlements.forget(cus)
    lookup = await env.entitlements.lookup(user)
    assert lookup.entitlement is not None and lookup.entitlement.status == "canceled"
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "canceled" and ent.source == "stripe"


async def test_stripe_down_other_events_ask_for_a_retry(env: Env) -> None:
    cus, sub_id = paying_customer(env.double)
    env.double.faults.fail_always(500)
    invoice = {"id": "in_1", "object": "invoice", "customer": cus, "subscription": sub_id}
    event = make_event("invoice.paid", invoice)
    payload = json.dumps(event)
    status, answer = await env.post(payload, sign(payload, DOUBLE_SECRET))
    assert (status, answer) == (503, {"error": "stripe_unavailable"})
    assert not await env.store.has_event(event["id"])  # so the retry is processed
    assert await env.store.get_entitlement(cus) is None

    env.double.faults.reset()
    env.entitlements.breaker.success()  # as after its cooldown: let the retry reach Stripe
    status, answer = await env.post(payload, sign(payload, DOUBLE_SECRET))
    assert (status, answer) == (200, {"status": "refreshed"})
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "active"


async def test_stripe_dropping_connections_counts_as_unavailable(env: Env) -> None:
    cus, _ = paying_customer(env.double)
    env.double.faults.drop_always()
    invoice = {"id": "in_1", "object": "invoice", "customer": cus}
    assert await env.send(make_event("invoice.payment_failed", invoice)) == (
        503,
        {"error": "stripe_unavailable"},
    )


async def test_stripe_rejecting_our_key_is_a_server_error_to_retry(env: Env) -> None:
    cus, _ = paying_customer(env.double)
    env.double.api_key = "sk_test_rotated"  # our key no longer works: 401
    event = make_event("invoice.paid", {"id": "in_1", "object": "invoice", "customer": cus})
    assert await env.send(event) == (500, {"error": "stripe_rejected"})
    assert not await env.store.has_event(event["id"])


# --- customers ----------------------------------------------------------------------------------


async def test_checkout_completed_stores_the_email_mapping(env: Env) -> None:
    api = await StripeClientAPI.create(env.settings)
    try:
        session = await api.create_checkout_session(
            {
                "mode": "subscription",
                "line_items": [{"price": PRICE, "quantity": 1}],
                "success_url": "http://127.0.0.1/_gate/success?session_id={CHECKOUT_SESSION_ID}",
                "customer_email": "Buyer@Example.com",
            },
            "idem-checkout-1",
        )
    finally:
        await api.close()
    await env.double.wait_deliveries()
    completed = await env.double.complete_checkout(session["id"])  # delivers its events
    cus = completed["customer"]
    assert isinstance(cus, str)
    assert all(status == 200 for _, status in env.double.deliveries)
    types = {e["type"] for e in env.double.events}
    assert "checkout.session.completed" in types
    assert await env.store.customer_ids_for_email("buyer@example.com") == [cus]
    ent = await env.store.get_entitlement(cus)
    assert ent is not None and ent.status == "active"


async def test_checkout_email_from_customer_email_when_no_details(env: Env) -> None:
    cus, _ = paying_customer(env.double, "someone@example.com")
    session = {
        "id": "cs_2",
        "object": "checkout.session",
        "customer": cus,
        "customer_details": None,
        "customer_email": "Other@Example.com ",
    }
    assert await env.send(make_event("checkout.session.completed", session)) == (
        200,
        {"status": "refreshed"},
    )
    assert await env.store.customer_ids_for_email("other@example.com") == [cus]


async def test_customer_deleted_forgets_everything(env: Env) -> None:
    cus, sub_id = paying_customer(env.double, "gone@example.com")
    await env.store.put_customer(cus, "gone@example.com")
    event = make_event("customer.subscription.updated", env.double.subscriptions[sub_id])
    assert await env.send(event) == (200, {"status": "refreshed"})
    identity = Identity(None, cus, "cookie")
    assert env.entitlements.lookup_cached(identity) is not None
    reads = env.stripe_reads()

    deleted = make_event("customer.deleted", env.double.customers[cus])
    assert await env.send(deleted) == (200, {"status": "forgotten"})
    assert await env.store.get_entitlement(cus) is None
    assert await env.store.customer_ids_for_email("gone@example.com") == []
    assert env.entitlements.lookup_cached(identity) is None
    assert env.stripe_reads() == reads  # no Stripe call needed


# --- logs ---------------------------------------------------------------------------------------


async def test_one_log_line_per_event_without_the_payload(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    cus, _ = paying_customer(env.double, "private.person@example.com")
    session = {
        "id": "cs_3",
        "object": "checkout.session",
        "customer": cus,
        "customer_details": {"email": "private.person@example.com", "name": "Private Person"},
    }
    event = make_event("checkout.session.completed", session)
    with caplog.at_level(logging.DEBUG, logger="gateway.webhooks"):
        assert (await env.send(event))[0] == 200
    records = [r for r in caplog.records if r.name == "gateway.webhooks"]
    assert len(records) == 1
    fields = getattr(records[0], "gate_fields", {})
    assert fields == {
        "type": "checkout.session.completed",
        "id": event["id"],
        "customer": cus,
        "outcome": "refreshed",
    }
    everything = "\n".join(
        f"{r.getMessage()} {getattr(r, 'gate_fields', '')}" for r in caplog.records
    )
    assert "private.person" not in everything
    assert "Private Person" not in everything
    assert DOUBLE_SECRET not in everything


# --- entitlements (tiers) -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tiered_webhook_url(env: Env, aiohttp_server: ServerFactory) -> AsyncIterator[str]:
    """The webhook endpoint's URL on a gate with the double's entitlements seeded and the
    ``analysis`` feature rule, its Entitlements owner on the real StripeClientAPI."""
    env.double.entitlements.seed()
    settings = changed(env.settings, feature_rules=("/api/analysis/*=analysis",))
    api = await StripeClientAPI.create(settings)
    entitlements = Entitlements(settings, env.store, api)
    try:
        server = await aiohttp_server(webhook_app(settings, env.store, entitlements))
        yield str(server.make_url(ROUTE))
    finally:
        await entitlements.close()
        await api.close()


async def test_active_entitlement_summary_event_refreshes_the_features(
    env: Env, aiohttp_server: ServerFactory
) -> None:
    """``entitlements.active_entitlement_summary.updated`` is handled like the subscription
    events: the customer is re-read (subscriptions and their products' features), through the
    one owner; while Stripe is down it asks for a retry (503)."""
    async with tiered_webhook_url(env, aiohttp_server) as url:
        cus, _ = paying_customer(env.double)
        summary = env.double.entitlements.summary(cus)
        assert [e["lookup_key"] for e in summary["entitlements"]["data"]] == [
            "analysis",
            "export",
            "search",
        ]
        event = make_event("entitlements.active_entitlement_summary.updated", summary)
        payload = json.dumps(event)
        assert await env.post(payload, sign(payload, DOUBLE_SECRET), url) == (
            200,
            {"status": "refreshed"},
        )
        ent = await env.store.get_entitlement(cus)
        assert ent is not None and ent.features == {"analysis", "export", "search"}
        env.double.faults.fail_next(5, status=500)
        event = make_event("entitlements.active_entitlement_summary.updated", summary)
        payload = json.dumps(event)
        status, _ = await env.post(payload, sign(payload, DOUBLE_SECRET), url)
        assert status == 503
        assert not await env.store.has_event(event["id"])


async def test_stripe_down_payload_keeps_the_features_of_the_same_plan(
    env: Env, aiohttp_server: ServerFactory
) -> None:
    """A subscription event applied from its payload (Stripe down) carries no entitlements:
    the same subscription on the same price keeps the stored features (a Pro user does not
    lose the Pro feature because a webhook arrived during an outage); another price does not."""
    async with tiered_webhook_url(env, aiohttp_server) as url:

        async def send(event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            payload = json.dumps(event)
            return await env.post(payload, sign(payload, DOUBLE_SECRET), url)

        cus, sub_id = paying_customer(env.double)
        sub = env.double.subscriptions[sub_id]
        assert await send(make_event("customer.subscription.updated", sub)) == (
            200,
            {"status": "refreshed"},
        )
        stored = await env.store.get_entitlement(cus)
        assert stored is not None and "analysis" in stored.features
        env.double.faults.fail_always(500)
        renewed = make_event("customer.subscription.updated", {**sub, "cancel_at_period_end": True})
        renewed["created"] = stored.event_created + 60
        assert await send(renewed) == (200, {"status": "applied_from_event"})
        ent = await env.store.get_entitlement(cus)
        assert ent is not None and ent.cancel_at_period_end and ent.features == stored.features
