"""The layered lookup and the one owner of entitlement state: :class:`Entitlements`.

``lookup(identity)`` answers from the first layer that knows: **L1** (:mod:`gateway.l1`, per
identity key and per customer, at most ``L1_TTL`` and never past the entitlement's
``expires_at``; :meth:`~Entitlements.lookup_cached` reads only this layer, without I/O) →
**operator grants** (:mod:`.grants`) → **the store** while fresh → **Stripe**
(:mod:`.sync`). An email without a customer is resolved by :mod:`.emails`. Concurrent misses of
one identity, customer or email share one task (:mod:`.flights`); across replicas a cold
customer is read by one of them (:mod:`.leases`).

Every change ends in ``_changed``, which drops what L1 (and so the remembered verdicts,
:attr:`Entitlements.verdicts`) derived from the old state and announces it (:class:`Changes`:
open WebSockets, other replicas); a change from another replica arrives in
:meth:`~Entitlements.on_remote`.

Failures: a store that cannot be read serves the last state this process knew (``_known``, until
its ``expires_at``); a transient Stripe failure serves the last stored state if it was read within
``STALE_IF_ERROR`` (``Lookup(stale=True)``), else ``Lookup(None, error=…)``. A state applied from
a webhook's payload during an outage (:meth:`~Entitlements.apply_event`, ``source`` =
:data:`PAYLOAD_SOURCE`) is not trusted for ``CACHE_TTL``: every load of it asks Stripe first.
"""

import asyncio
import dataclasses
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from gateway import rules
from gateway.changes import Change, Changes
from gateway.entitlement.base import (
    ERROR_REJECTED,
    ERROR_UNAVAILABLE,
    PAYLOAD_SOURCE,
    EntitlementStats,
    StaleEvent,
)
from gateway.entitlement.emails import EmailCustomers
from gateway.entitlement.events import OTHER_SUBSCRIPTION_KEPT, payload_entitlement
from gateway.entitlement.flights import Flights
from gateway.entitlement.grants import Grants
from gateway.entitlement.leases import Leased, Leases
from gateway.entitlement.sync import CustomerSync
from gateway.feature_catalog import ProductFeatures
from gateway.l1 import L1, L1Entry, Verdicts
from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock, Entitlement, Identity, Lookup
from gateway.settings import Settings
from gateway.store import Store, StoreError
from gateway.stripe_api import StripeAPI, StripeError, StripeRejected, StripeUnavailable
from gateway.stripe_breaker import CircuitBreaker

log = logging.getLogger("gateway.entitlement")

#: The L1 key prefix of a team member's lookup (:meth:`Entitlements.key_of`).
MEMBER_KEY = "member:"


class Entitlements:
    """The layered entitlement cache (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        stripe: StripeAPI,
        clock: Clock = SYSTEM_CLOCK,
        changes: Changes | None = None,
        leases: Leases | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        # Last state known per customer (bounded like L1): served while the store is down.
        self._known: OrderedDict[str, Entitlement] = OrderedDict()
        self._known_max = settings.l1_max_entries
        #: Where every change of a customer is announced (open WebSockets, other replicas).
        self.changes = changes if changes is not None else Changes()
        # The process's one Stripe client (its breaker and limiter inside), as it is.
        self._stripe = stripe
        self._now = clock.now
        self._time = clock.time
        self._l1 = L1(settings.l1_max_entries, clock)
        self._l1_ttl = float(settings.l1_ttl)
        self._stale = timedelta(seconds=settings.stale_if_error)
        self._negative_ttl = timedelta(seconds=settings.negative_cache_ttl)
        self.stats = EntitlementStats()
        #: The gate's remembered allowed verdicts, resting on this cache's L1 entries (the
        #: gate and forward auth read them directly: ``Services.verdicts``).
        self.verdicts = Verdicts(self._l1, clock, self.stats)
        self._flights = Flights(self.stats)
        self._leased = Leased(leases, self.stats)
        self._grants = Grants(store, clock, timedelta(seconds=settings.cache_ttl))
        self._sync = CustomerSync(settings, store, self._stripe, clock, self.stats, self._read)
        self._emails = EmailCustomers(
            store, self._stripe, clock, self._negative_ttl, self.stats, self._flights, self._leased
        )
        #: Features per product, shared by every customer (the upgrade page reads it too).
        self.products: ProductFeatures = self._sync.products
        #: Active team memberships, email → the team's customer (kept by
        #: :class:`gateway.teams.service.Teams`; empty without teams), and the store read that
        #: tells on an L1 miss whether an email is a member (None: no teams).
        self.memberships: Mapping[str, str] = {}
        self.team_of: Callable[[str], Awaitable[str | None]] | None = None
        #: Told when an email pays as a customer (a team member's own subscription).
        self.on_link: Callable[[str, str], None] | None = None
        self.changes.listen(self.on_remote)

    def now(self) -> datetime:
        """The time on this cache's clock (the services' one clock)."""
        return self._now()

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker in front of Stripe (shared with every Stripe call)."""
        return self._stripe.breaker

    # --- reads --------------------------------------------------------------------------------

    def key_of(self, identity: Identity) -> str:
        """The L1 key of ``identity``: a team member's lookup (the best of the team's and
        their own) lives under a key of its own, never under a customer's."""
        email = identity.email
        if email is not None and email in self.memberships:
            return MEMBER_KEY + email
        return identity.key

    def lookup_cached(self, identity: Identity) -> Lookup | None:
        """The L1 answer for ``identity``, or None on a miss. No I/O: for the hot path."""
        lookup = self._l1.get(self.key_of(identity))
        if lookup is not None:
            self.stats.l1_hits += 1
        return lookup

    async def lookup(self, identity: Identity) -> Lookup:
        """What ``identity`` is entitled to: L1, grants, store, then Stripe. Never raises for
        Stripe or store failures (see :class:`~gateway.model.Lookup`'s ``stale`` / ``error``)."""
        hit = self.lookup_cached(identity)
        if hit is not None:
            return hit
        self.stats.l1_misses += 1
        key = f"who:{identity.key}|{identity.email or ''}"  # the email matters for grants
        return await self._flights.run(key, functools.partial(self._load, identity))

    async def stored(self, customer_id: str) -> Entitlement | None:
        """The customer's stored entitlement, fresh or not (no Stripe call, no L1).
        Raises :class:`StoreError`."""
        return await self._store.get_entitlement(customer_id)

    async def customer_ids(self) -> list[str]:
        """Every customer the store knows (``gateway sync --all``). Raises :class:`StoreError`."""
        return await self._store.list_customers()

    async def customers_for_email(self, email: str, *, fresh: bool = False) -> list[str]:
        """The Stripe customers with this email: from the store, else from Stripe (and then
        remembered; an empty answer for ``NEGATIVE_CACHE_TTL``). ``fresh``: ask Stripe now
        whatever the store remembers, and add the ones the store knows (a customer a Checkout
        made a moment ago counts: who may have a free trial). Raises :class:`StripeError`."""
        return await self._emails.customers(email, fresh=fresh)

    # --- changes (this object is their only writer) -------------------------------------------

    async def refresh(
        self, customer_id: str, *, source: str = "stripe", event_created: int = 0
    ) -> Entitlement:
        """Re-read the customer from Stripe now (checkout success, webhooks, ``gateway sync``)
        and write the store and L1. Raises :class:`StripeUnavailable` (also while the breaker
        is open) or :class:`StripeRejected` (other than not-found)."""
        ent = await self._sync.read(
            customer_id, fresh=True, source=source, event_created=event_created
        )
        grant = await self._grants.active(customer_id)
        if grant is not None:  # an operator's grant still wins for access
            self._fill(customer_id, Lookup(self._grants.entitlement(customer_id, grant)))
        return ent

    async def apply_event(
        self, customer_id: str, created: int, subscription: Mapping[str, Any] | None = None
    ) -> str:
        """A webhook event about the customer, created at ``created`` (Unix seconds): re-read
        Stripe (so delivery order does not matter). When Stripe is unreachable and the event
        carries a ``subscription`` object (``customer.subscription.*``), apply it under the
        outage policy (:mod:`.events`), stored only if strictly newer than the stored state.

        Returns the outcome: ``refreshed``, ``applied_from_event`` or
        ``other_subscription_kept``. Raises :class:`StaleEvent` (the payload cannot be
        ordered: to be delivered again), :class:`StripeUnavailable` (no payload to apply),
        :class:`StripeRejected` or :class:`StoreError`."""
        try:
            await self.refresh(customer_id, source="webhook", event_created=created)
        except StripeUnavailable:
            if subscription is None:
                raise
            stored = await self._store.get_entitlement(customer_id)
            ent = payload_entitlement(
                customer_id, created, subscription, stored, self._settings, self._now()
            )
            if ent is None:
                return OTHER_SUBSCRIPTION_KEPT
            if not await self.apply_if_newer(ent):
                # Not strictly newer (e.g. "updated: active" of the same second as "deleted"):
                # the payload cannot tell which came last.
                raise StaleEvent from None
            return "applied_from_event"
        return "refreshed"

    async def apply_if_newer(self, ent: Entitlement) -> bool:
        """Store ``ent`` (built from a webhook's payload while Stripe is unreachable) if it is
        strictly newer than the stored state; whether it was. Raises :class:`StoreError`.

        It is stored with ``source`` :data:`PAYLOAD_SOURCE`: such a state is only the best
        guess of an outage, so a lookup re-reads Stripe before serving it (see ``_load_customer``)
        instead of trusting it for ``CACHE_TTL``."""
        ent = dataclasses.replace(ent, source=PAYLOAD_SOURCE)
        applied = await self._store.put_entitlement_if_newer(ent, strictly=True)
        if applied:
            self._changed(ent.customer_id)
        return applied

    async def link_customer(self, customer_id: str, email: str | None) -> None:
        """Remember that ``email`` pays as ``customer_id`` (Checkout completed, success page).
        Raises :class:`StoreError`."""
        await self._store.put_customer(customer_id, email)
        self._changed(customer_id)
        if self.on_link is not None and email:
            self.on_link(customer_id, email)

    async def delete_customer(self, customer_id: str) -> None:
        """The customer is gone from Stripe (``customer.deleted``): forget its entitlement
        and its emails. Raises :class:`StoreError`."""
        await self._store.delete_entitlement(customer_id)
        await self._store.forget_customer(customer_id)
        self._changed(customer_id)

    async def grant(self, subject: str, until: datetime, note: str = "") -> None:
        """An operator's grant of access to a customer id or an email until ``until``; it
        wins over Stripe. Raises :class:`StoreError`."""
        await self._grants.put(subject, until, note)
        self._changed(None if "@" in subject else subject)

    async def revoke(self, subject: str) -> bool:
        """Remove the grant of a customer id or an email; whether there was one.
        Raises :class:`StoreError`."""
        removed = await self._grants.delete(subject)
        self._changed(None if "@" in subject else subject)
        return removed

    def forget(self, customer_id: str) -> None:
        """Drop the customer from L1 (and identities that depend on it, and cached "no
        customer for this email" answers), so the next lookup reads the store."""
        self._changed(customer_id)

    def on_remote(self, change: Change) -> None:
        """A :class:`Changes` listener: a change made on another replica drops what L1 (and
        so the verdicts) hold for it here; local changes did so already (``_changed``)."""
        if not change.remote:
            return
        if change.kind == "everyone":
            self._l1.clear()
            self._known.clear()
        elif change.kind == "customer" and change.key:
            self._l1.drop_customer(change.key)
            self._known.pop(change.key, None)
            self._leased.wake(f"cus:{change.key}")

    def _changed(self, customer_id: str | None) -> None:
        """The one place that learns of a change of a customer (None: of anyone, e.g. a grant
        to an email): drop what L1 holds for it, and so every verdict derived from that; tell
        the listeners (open WebSockets, other replicas)."""
        if customer_id is None:
            self._l1.clear()
            self._known.clear()
        else:
            self._l1.drop_customer(customer_id)
            self._known.pop(customer_id, None)
        self.changes.customer(customer_id)

    def _read(self, customer_id: str, ent: Entitlement) -> None:
        """A Stripe read of the customer was written: its L1 state is that read now."""
        self._changed(customer_id)
        self._fill(customer_id, Lookup(ent))

    async def close(self) -> None:
        """Cancel and await the in-flight lookups and Stripe reads. Idempotent."""
        self._leased.closed = True
        tasks: list[asyncio.Task[Any]] = [*self._flights.close(), *self._sync.close()]
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):  # already logged by the task's own handler
                log_event(log, "close_task_failed", level=logging.DEBUG, error=repr(result))

    # --- the layers ---------------------------------------------------------------------------

    async def _load(self, identity: Identity) -> Lookup:
        """L1 miss for an identity: a team member's lookup, else :meth:`_own`."""
        if self.team_of is not None and identity.email:
            try:
                team = await self.team_of(identity.email)
            except StoreError as exc:  # the member's own access still counts
                log_event(log, "team_unread", level=logging.WARNING, error=str(exc))
                team = None
            if team is not None:
                own = await self._own(identity)
                held = self._l1.peek(identity.key)
                deps = held.customers if held is not None else ()
                # The best access wins (the team's on a tie): their own subscription may be
                # the better one.
                lookup = self._best([await self._customer(team), own])
                self._fill(MEMBER_KEY + identity.email, lookup, (team, *deps))
                return lookup
        return await self._own(identity)

    async def _own(self, identity: Identity) -> Lookup:
        """An identity's own lookup: grant by email, resolve customers, best of their lookups."""
        key = identity.key
        if identity.email:
            grant = await self._grants.active(identity.email)
            if grant is not None:
                who = identity.customer_id or key
                lookup = Lookup(self._grants.entitlement(who, grant))
                self._fill(key, lookup, (identity.customer_id,) if identity.customer_id else ())
                return lookup
        if identity.customer_id:
            return await self._customer(identity.customer_id)
        if not identity.email:
            return Lookup(None)
        try:
            customers = await self._emails.customers(identity.email)
        except StripeError as exc:
            self.stats.errors += 1
            log_event(log, "email_lookup_failed", level=logging.WARNING, error=str(exc))
            rejected = isinstance(exc, StripeRejected)
            return Lookup(None, error=ERROR_REJECTED if rejected else ERROR_UNAVAILABLE)
        if not customers:
            lookup = Lookup(None)
        else:
            lookup = self._best([await self._customer(c) for c in customers])
        self._fill(key, lookup, tuple(customers))
        return lookup

    async def _customer(self, customer_id: str) -> Lookup:
        hit = self._l1.get(customer_id)
        if hit is not None:
            return hit
        return await self._flights.run(
            f"cus:{customer_id}", functools.partial(self._load_customer, customer_id)
        )

    def _served(self, customer_id: str, ent: Entitlement) -> Lookup:
        lookup = Lookup(ent)
        self._fill(customer_id, lookup)
        return lookup

    async def _load_customer(self, customer_id: str) -> Lookup:
        grant = await self._grants.active(customer_id)
        if grant is not None:
            return self._served(customer_id, self._grants.entitlement(customer_id, grant))
        try:
            stored = await self._store.get_entitlement(customer_id)
        except StoreError as exc:
            log_event(log, "store_read_failed", level=logging.WARNING, op="get", error=str(exc))
            stored = self._known.get(customer_id)
            if stored is not None and stored.expires_at > self._now():
                self.stats.known_served += 1
                return self._served(customer_id, stored)
        if stored is not None and stored.source == PAYLOAD_SOURCE:
            # Written from an event's payload during an outage: ask Stripe first (the breaker
            # bounds the attempts while it is still down), else serve that state as stored.
            return await self._payload_state(customer_id, stored)
        if stored is not None and stored.expires_at > self._now():
            self.stats.store_hits += 1
            return self._served(customer_id, stored)
        try:
            ent = await self._leased.run(
                f"cus:{customer_id}",
                functools.partial(self._fresh_in_store, customer_id, stored),
                functools.partial(self._sync.read, customer_id, fresh=False),
            )
        except StripeUnavailable:
            return self._fallback(customer_id, stored, ERROR_UNAVAILABLE)
        except StripeRejected as exc:
            log_event(
                log, "stripe_rejected", level=logging.ERROR, customer=customer_id, error=str(exc)
            )
            return self._fallback(customer_id, stored, ERROR_REJECTED)
        return Lookup(ent)

    async def _fresh_in_store(
        self, customer_id: str, before: Entitlement | None
    ) -> Entitlement | None:
        """The customer's stored state if another replica wrote a fresh one since ``before``
        was read (then in L1 too), else None. Raises :class:`StoreError`."""
        ent = await self._store.get_entitlement(customer_id)
        if ent is None or ent.expires_at <= self._now() or ent == before:
            return None
        self._fill(customer_id, Lookup(ent))
        return ent

    async def _payload_state(self, customer_id: str, stored: Entitlement) -> Lookup:
        """A stored state that came from a webhook's payload: Stripe's answer if it has one now,
        else the payload state while fresh (then stale-if-error, as any stored state)."""
        try:
            # Stamped no older than the payload, so this read replaces it (a read that starts
            # after the event was stored is truer than the event).
            read = self._sync.read(customer_id, fresh=False, event_created=stored.event_created)
            return Lookup(await read)
        except StripeError as exc:
            log_event(
                log,
                "payload_state_kept",
                level=logging.INFO,
                customer=customer_id,
                error=type(exc).__name__,
            )
        if stored.expires_at > self._now():
            self.stats.store_hits += 1
            return self._served(customer_id, stored)
        return self._fallback(customer_id, stored, ERROR_UNAVAILABLE)

    def _fallback(self, customer_id: str, stored: Entitlement | None, error: str) -> Lookup:
        """Stripe failed: the stored state if recent enough (stale-if-error), else an error."""
        now = self._now()
        if stored is not None and now - stored.checked_at <= self._stale:
            self.stats.stale_served += 1
            lookup = Lookup(stored, stale=True)
            self._fill(customer_id, lookup)
            return lookup
        self.stats.errors += 1
        return Lookup(None, error=error)

    def _best(self, lookups: Sequence[Lookup]) -> Lookup:
        """Several customers for one email: the best access wins; an unknown one (error) beats
        a known denial, since it may be the paying one."""
        now = self._now()
        known = [lk for lk in lookups if lk.entitlement is not None]
        failed = [lk for lk in lookups if lk.entitlement is None and lk.error]

        def rank(lk: Lookup) -> tuple[bool, bool, float]:
            acc = rules.access(lk.entitlement, self._settings, now)
            end = acc.ends_at.timestamp() if acc.ends_at is not None else float("inf")
            return (acc.allowed, not lk.stale, end if acc.allowed else 0.0)

        if not known:
            return failed[0] if failed else Lookup(None)
        best = max(known, key=rank)
        if failed and not rules.access(best.entitlement, self._settings, now).allowed:
            return failed[0]
        return best

    # --- L1 -----------------------------------------------------------------------------------

    def _fill(self, key: str, lookup: Lookup, customers: tuple[str, ...] | None = None) -> None:
        if lookup.error is not None:
            return  # errors are not cached: the breaker already keeps Stripe from being hammered
        now = self._time()
        until = now + self._l1_ttl
        ent = lookup.entitlement
        if ent is None:
            until = min(until, now + self._negative_ttl.total_seconds())
        elif lookup.stale:
            until = min(until, (ent.checked_at + self._stale).timestamp())
        else:
            until = min(until, ent.expires_at.timestamp())
        if until <= now:
            return
        deps = customers if customers is not None else (key,)
        self._l1.put(key, L1Entry(lookup, until, deps))
        if ent is not None and customers is None and ent.customer_id == key:
            self._known[key] = ent
            self._known.move_to_end(key)
            while len(self._known) > self._known_max:
                self._known.popitem(last=False)
