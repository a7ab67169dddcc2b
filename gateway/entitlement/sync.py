"""Reads of a customer from Stripe, written to the store (and handed to L1 by the owner).

:meth:`CustomerSync.read` reads the customer's subscriptions (``status=all``) →
:func:`gateway.rules.summarize` (and, with ``FEATURE_RULES`` set and access granted, the
features of the products and prices of the subscriptions the rules accept,
:func:`gateway.rules.feature_sources`, from the process's product cache
:class:`~gateway.feature_catalog.ProductFeatures`) → the store, if not older than what it holds.

Reads of one customer are serialized: a ``fresh`` read (webhook, checkout success) always gets
one that *started after* it was asked for, joining an already queued one if there is, so three
webhooks for one checkout cost at most two reads and the newest read is the one written last; a
non-fresh read joins whatever is running or queued. Every read is stamped ``event_created`` =
max(the event's ``created``, the read's start time) and written only if not older than what is
stored, so a late, older event never overwrites a newer read.
"""

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway import rules
from gateway.entitlement.base import EntitlementStats, counted
from gateway.feature_catalog import ProductFeatures
from gateway.logs import log_event
from gateway.model import Clock, Entitlement
from gateway.settings import Settings
from gateway.store import Store, StoreError
from gateway.stripe_api import StripeAPI, StripeError, StripeRejected

log = logging.getLogger("gateway.entitlement")


@dataclass
class _Slot:
    """Stripe reads of one customer: the one running and the one queued behind it."""

    running: "asyncio.Future[Entitlement] | None" = None
    queued: "asyncio.Future[Entitlement] | None" = None
    source: str = "stripe"
    event_created: int = 0
    driver: "asyncio.Task[None] | None" = field(default=None, repr=False)


def _consume(fut: "asyncio.Future[Any]") -> None:
    # Waiters get the exception through their shield; without waiters it was logged already.
    if not fut.cancelled():
        fut.exception()


class CustomerSync:
    """Serialized Stripe reads per customer (see the module docstring). ``on_read(customer_id,
    entitlement)`` runs after each read is written (the owner drops and refills L1 there)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        stripe: StripeAPI,
        clock: Clock,
        stats: EntitlementStats,
        on_read: Callable[[str, Entitlement], None],
    ) -> None:
        self._settings = settings
        self._store = store
        self._stripe = stripe
        self._now = clock.now
        self._stats = stats
        self._on_read = on_read
        self._slots: dict[str, _Slot] = {}
        self.closed = False
        #: Features per product, shared by every customer (the upgrade page reads it too);
        #: its Stripe reads are this cache's (counted in ``stats``).
        self.products = ProductFeatures(self._read_product_features, clock)

    async def read(
        self, customer_id: str, *, fresh: bool, source: str = "stripe", event_created: int = 0
    ) -> Entitlement:
        """A Stripe read of the customer, written to the store. ``fresh``: one that starts after
        this call (else an in-flight one is good enough). Raises :class:`StripeError`."""
        if self.closed:
            return await self._read_once(customer_id, source, event_created)
        slot = self._slots.get(customer_id)
        if slot is None:
            slot = self._slots[customer_id] = _Slot()
        pending = slot.running if slot.running is not None else slot.queued
        if not fresh and pending is not None:
            self._stats.coalesced += 1
            return await asyncio.shield(pending)
        if slot.queued is None:
            slot.queued = asyncio.get_running_loop().create_future()
            slot.queued.add_done_callback(_consume)
            slot.source, slot.event_created = source, event_created
        else:
            self._stats.coalesced += 1
            if source != "stripe":
                slot.source = source
            slot.event_created = max(slot.event_created, event_created)
        future = slot.queued
        if slot.driver is None:
            slot.driver = asyncio.get_running_loop().create_task(
                self._drive(customer_id, slot), name=f"entitlement sync {customer_id}"
            )
        return await asyncio.shield(future)

    def close(self) -> list["asyncio.Task[None]"]:
        """Refuse new owned reads; cancel the running ones (settling their waiters) and hand
        them back to be awaited."""
        self.closed = True
        tasks = [slot.driver for slot in self._slots.values() if slot.driver is not None]
        for task in tasks:
            task.cancel()
        # A driver cancelled before it ran never settles its futures: do it for its waiters.
        for slot in self._slots.values():
            for future in (slot.running, slot.queued):
                if future is not None:
                    future.cancel()
        return tasks

    async def _drive(self, customer_id: str, slot: _Slot) -> None:
        """Run the customer's queued reads one after the other."""
        try:
            while slot.queued is not None:
                future = slot.queued
                slot.queued, slot.running = None, future
                source, event_created = slot.source, slot.event_created
                try:
                    ent = await self._read_once(customer_id, source, event_created)
                except asyncio.CancelledError:
                    future.cancel()
                    if slot.queued is not None:
                        slot.queued.cancel()
                        slot.queued = None
                    raise
                except (StripeError, StoreError) as exc:
                    if not future.done():
                        future.set_exception(exc)
                except Exception as exc:  # a bug: log it here, the waiters re-raise it
                    log_event(
                        log,
                        "sync_failed",
                        level=logging.ERROR,
                        customer=customer_id,
                        error=repr(exc),
                    )
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(ent)
                finally:
                    slot.running = None
        finally:
            slot.driver = None
            if self._slots.get(customer_id) is slot:
                del self._slots[customer_id]

    async def _read_product_features(self, product_id: str) -> list[dict[str, Any]]:
        return await counted(
            self._stats, functools.partial(self._stripe.list_product_features, product_id)
        )

    async def _subscriptions(self, customer_id: str) -> list[dict[str, Any]]:
        """The customer's subscriptions (one counted call); a customer gone from Stripe has
        none: no subscription, no entitlement."""
        read: Callable[[], Awaitable[list[dict[str, Any]]]] = functools.partial(
            self._stripe.list_subscriptions, customer_id
        )
        try:
            return await counted(self._stats, read)
        except StripeRejected as exc:
            if not exc.not_found:
                raise
            return []

    async def _read_once(self, customer_id: str, source: str, event_created: int) -> Entitlement:
        """Read the customer's subscriptions from Stripe; write the store; tell the owner."""
        started = self._now()
        subscriptions = await self._subscriptions(customer_id)
        stamp = max(event_created, int(started.timestamp()))
        now = self._now()
        settings = self._settings
        ent = rules.summarize(
            customer_id, subscriptions, settings, now, source=source, event_created=stamp
        )
        if settings.feature_rules and rules.access(ent, settings, now).allowed:
            ent = dataclasses.replace(ent, features=await self._features(subscriptions, now))
        try:
            if not await self._store.put_entitlement_if_newer(ent):
                newer = await self._store.get_entitlement(customer_id)
                if newer is not None:
                    log_event(
                        log,
                        "stripe_read_superseded",
                        customer=customer_id,
                        stored_event=newer.event_created,
                        read=stamp,
                    )
                    ent = newer
        except StoreError as exc:  # Stripe answered: serve it, the store catches up next time
            log_event(
                log,
                "store_write_failed",
                level=logging.WARNING,
                customer=customer_id,
                error=str(exc),
            )
        self._on_read(customer_id, ent)
        return ent

    async def _features(
        self, subscriptions: Sequence[Mapping[str, Any]], now: datetime
    ) -> frozenset[str]:
        """The features of the subscriptions the rules accept: their products' (cached per
        product) and their prices' ``PRICE_FEATURES``. Part of the read of the subscriptions:
        its singleflight, ordering and stale-if-error (a product Stripe cannot tell now and
        never told fails the read)."""
        keys: set[str] = set()
        for price_id, product_id in rules.feature_sources(subscriptions, self._settings, now):
            keys |= self._settings.price_feature_map.get(price_id, frozenset())
            if product_id is not None:
                keys |= await self.products.get(product_id)
        return frozenset(keys)
