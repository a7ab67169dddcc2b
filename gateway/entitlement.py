"""What a user paid for: a layered cache in front of Stripe.

``lookup(identity)`` answers from the first layer that knows:

1. **L1** (:mod:`gateway.l1`) — an in-process LRU of :class:`~gateway.model.Lookup` per identity
   key and per customer, bounded by ``L1_MAX_ENTRIES``, each entry kept ``L1_TTL`` but never past
   the entitlement's own ``expires_at``. :meth:`Entitlements.lookup_cached` reads only this layer,
   synchronously: a hit costs no SQLite I/O and no Stripe call. The gate's remembered allowed
   verdicts rest on these entries (:attr:`Entitlements.cached_verdict`,
   :meth:`Entitlements.remember_verdict`) and die with them.
2. **Operator grants** (``gateway grant``) for the customer or the email: they take precedence.
3. **The store** — the last entitlement read from Stripe, while fresh (``expires_at > now``).
4. **Stripe** — ``list_subscriptions`` → :func:`gateway.rules.summarize` (and, with
   ``FEATURE_RULES`` set and access granted, the features of the products and prices of the
   subscriptions the rules accept, :func:`gateway.rules.feature_sources`, from the process's
   product cache :class:`~gateway.feature_catalog.ProductFeatures` — never Stripe's active
   entitlements, the union over every subscription — stored with the entitlement as
   ``features``) → store + L1. Non-payers
   are cached too (``NEGATIVE_CACHE_TTL``, set by ``summarize``), as are emails without a
   customer (the email → customers lookup is remembered in the store).

Concurrency: N concurrent misses for one identity, customer or email share one task
(singleflight); the shared task is shielded, so a cancelled caller does not cancel the others,
and it is owned by this object (cancelled and awaited by :meth:`Entitlements.close`). Stripe
reads of one customer are also serialized: a :meth:`~Entitlements.refresh` (webhook, checkout
success) always gets a read that *started after* it was asked for, joining an already queued one
if there is, so three webhooks for one checkout cost at most two reads and the newest read is
the one written last.

One owner: this object is the only writer of customers, entitlements, email lookups and grants
(webhooks, pages and the operator CLI call its methods: :meth:`~Entitlements.link_customer`,
:meth:`~Entitlements.delete_customer`, :meth:`~Entitlements.apply_if_newer`,
:meth:`~Entitlements.refresh`, :meth:`~Entitlements.grant`, :meth:`~Entitlements.revoke`), and
every change ends in one place, ``_changed``, which drops what L1 and the verdicts derived from
the old state (and is where other replicas will be told).

Replicas (PostgreSQL, :mod:`gateway.replicas`): a change made on another replica arrives as a
remote :class:`~gateway.changes.Change` and :meth:`~Entitlements.on_remote` drops what L1 (and
the verdicts) hold for it, without announcing it again. With ``leases`` (a cross-replica
singleflight), a cold customer is read from Stripe by one replica only: the one that gets the
lease reads and writes the store (whose change notification wakes the others); the others wait
up to ``leases.wait`` seconds for the store to have it, then read Stripe themselves.

Store down: a customer whose L1 entry expired while the store cannot be read is served from the
last state this process knew (``_known``, as long as L1 would have kept it were it not for
``L1_TTL``: until its ``expires_at``, then stale-if-error) — a paying user keeps access while
the database is away, and costs no extra Stripe call.

Failures: a transient Stripe failure serves the last stored state if it was read within
``STALE_IF_ERROR`` (``Lookup(stale=True)``), else ``Lookup(None, error="stripe_unavailable")``.
Stripe calls go through :class:`~gateway.stripe_api.GuardedStripe` (rate limit, circuit
breaker shared with every other Stripe call of the process); while the breaker is open the
cache serves stale state as for any transient failure. A customer Stripe no longer knows (404)
has no subscription. A store failure is logged and treated as a miss: Stripe still answers.

A state applied from a webhook's payload while Stripe was down (``source`` =
:data:`PAYLOAD_SOURCE`) is not trusted for ``CACHE_TTL``: every load of it (each L1 miss, so at
least every ``L1_TTL``) asks Stripe first and serves the payload state only while Stripe still
fails — so the truth is back within ``L1_TTL`` of Stripe answering again.

Ordering with webhooks: every Stripe read is written with ``event_created`` = max(the event's
``created``, the read's start time), and only if not older than what is stored. So an event
applied from its payload while Stripe is down (:meth:`~Entitlements.apply_if_newer`) is never
overwritten by an older read, and a late, older event never overwrites a newer read. A payload
must be *strictly* newer than the stored state: two events of the same second cannot be ordered.
"""

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar, cast

from gateway import rules
from gateway.changes import Change, Changes
from gateway.feature_catalog import ProductFeatures
from gateway.l1 import L1, Guard, L1Entry, VerdictLookup, Verdicts
from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock, Entitlement, Identity, Lookup
from gateway.settings import Settings
from gateway.store import Grant, Store, StoreError, normalize_email
from gateway.stripe_api import (
    BREAKER_COOLDOWN,
    BREAKER_THRESHOLD,
    CircuitBreaker,
    StripeAPI,
    StripeBreakerOpen,
    StripeError,
    StripeRejected,
    StripeUnavailable,
    guarded,
)

__all__ = [
    "BREAKER_COOLDOWN",
    "BREAKER_THRESHOLD",
    "ERROR_REJECTED",
    "ERROR_UNAVAILABLE",
    "PAYLOAD_SOURCE",
    "CircuitBreaker",
    "EntitlementStats",
    "Entitlements",
    "Leases",
]

log = logging.getLogger("gateway.entitlement")

T = TypeVar("T")

ERROR_UNAVAILABLE = "stripe_unavailable"
ERROR_REJECTED = "stripe_rejected"
#: ``Entitlement.source`` of a state applied from a webhook's payload (Stripe unreachable).
PAYLOAD_SOURCE = "webhook_payload"


class Leases(Protocol):
    """A cross-replica singleflight (:class:`gateway.replicas.StoreLeases`)."""

    #: How long a replica without the lease waits for its holder's answer (seconds).
    wait: float

    async def acquire(self, name: str) -> bool: ...

    async def release(self, name: str) -> None: ...


#: How often a replica waiting for a lease holder re-reads the store (seconds).
_LEASE_POLL = 0.05


@dataclass
class EntitlementStats:
    """Counters for metrics and tests."""

    l1_hits: int = 0
    l1_misses: int = 0
    store_hits: int = 0
    stripe_calls: int = 0
    stale_served: int = 0
    errors: int = 0
    coalesced: int = 0  # callers that joined an in-flight lookup or sync
    breaker_skips: int = 0  # Stripe calls skipped because the breaker was open
    lease_waits: int = 0  # cold loads answered by another replica's Stripe read
    known_served: int = 0  # L1-expired states served while the store could not be read

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _SyncSlot:
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


class Entitlements:
    """The layered entitlement cache (see the module docstring)."""

    #: ``cached_verdict(cookie_header)``: the upstream headers of an allowed verdict remembered
    #: for this raw ``Cookie`` header (:meth:`remember_verdict`) while it still holds, else
    #: None. No I/O: the hot path of a paying user. A hit counts as an L1 hit. The second
    #: argument is the feature the path needs (None: none); a verdict without it misses.
    cached_verdict: VerdictLookup

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
        self._leases = leases
        # Last state known per customer (bounded like L1): served while the store is down.
        self._known: OrderedDict[str, Entitlement] = OrderedDict()
        self._known_max = settings.l1_max_entries
        self._arrived: dict[str, asyncio.Event] = {}  # customers a lease waiter waits for
        self._store = store
        #: Where every change of a customer is announced (open WebSockets, other replicas).
        self.changes = changes if changes is not None else Changes()
        # The process's one door to Stripe when given one (services), else a new one (tests).
        self._stripe = guarded(stripe, settings, clock=clock)
        #: Features per product, shared by every customer (the upgrade page reads it too);
        #: its Stripe reads are this cache's (counted in :attr:`stats`).
        self.products = ProductFeatures(self._read_product_features, clock)
        self._now = clock.now
        self._time = clock.time
        self._l1 = L1(settings.l1_max_entries, clock)

        self._l1_ttl = float(settings.l1_ttl)
        self._stale = timedelta(seconds=settings.stale_if_error)
        self._negative_ttl = timedelta(seconds=settings.negative_cache_ttl)
        self._cache_ttl = timedelta(seconds=settings.cache_ttl)
        self._flights: dict[str, asyncio.Task[Any]] = {}
        self._syncs: dict[str, _SyncSlot] = {}
        self._closed = False
        self.stats = EntitlementStats()
        self._verdicts = Verdicts(self._l1, clock, self.stats)
        # The verdict cache's own method, bound: the paying user's hot path is one call.
        self.cached_verdict = self._verdicts.get
        self.changes.listen(self.on_remote)

    def now(self) -> datetime:
        """The time on this cache's clock (the services' one clock)."""
        return self._now()

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker in front of Stripe (shared with every Stripe call)."""
        return self._stripe.breaker

    # --- public API ---------------------------------------------------------------------------

    def lookup_cached(self, identity: Identity) -> Lookup | None:
        """The L1 answer for ``identity``, or None on a miss. No I/O: for the hot path."""
        lookup = self._l1.get(identity.key)
        if lookup is not None:
            self.stats.l1_hits += 1
        return lookup

    def remember_verdict(
        self,
        cookie_header: str,
        identity: Identity,
        lookup: Lookup,
        headers: Mapping[str, str],
        until: float,
        session: Guard,
        features: frozenset[str] = frozenset(),
    ) -> Mapping[str, str]:
        """Remember that requests with this ``Cookie`` header are allowed with ``headers``
        (on paths needing no feature or one of ``features``),
        until ``until`` (Unix seconds on this cache's clock: the access's scheduled end) and
        never past the L1 entry for ``identity`` nor the session cache entry ``session`` —
        and only if ``lookup`` is what L1 holds for it now. Any change of the customer, and
        the session's revocation on this worker, end it at once.

        Returns the read-only headers that :meth:`cached_verdict` hands out (also when
        nothing was kept)."""
        return self._verdicts.put(
            cookie_header, identity.key, lookup, headers, until, session, features
        )

    def verdict_until(self, cookie_header: str) -> float | None:
        """When the verdict remembered for ``cookie_header`` ends (Unix seconds), if any."""
        return self._verdicts.until(cookie_header)

    def verdict_features(self, cookie_header: str) -> frozenset[str] | None:
        """The customer's features remembered with the verdict for ``cookie_header``, if any."""
        return self._verdicts.features(cookie_header)

    @property
    def verdicts_kept(self) -> int:
        """How many verdicts are remembered (for tests and metrics)."""
        return len(self._verdicts)

    async def lookup(self, identity: Identity) -> Lookup:
        """What ``identity`` is entitled to: L1, grants, store, then Stripe. Never raises for
        Stripe or store failures (see :class:`~gateway.model.Lookup`'s ``stale`` / ``error``)."""
        hit = self.lookup_cached(identity)
        if hit is not None:
            return hit
        self.stats.l1_misses += 1
        key = f"who:{identity.key}|{identity.email or ''}"  # the email matters for grants
        return await self._flight(key, functools.partial(self._load, identity))

    async def refresh(
        self, customer_id: str, *, source: str = "stripe", event_created: int = 0
    ) -> Entitlement:
        """Re-read the customer from Stripe now (checkout success, webhooks, ``gateway sync``)
        and write the store and L1. Raises :class:`StripeUnavailable` (also while the breaker
        is open) or :class:`StripeRejected` (other than not-found)."""
        ent = await self._sync(customer_id, fresh=True, source=source, event_created=event_created)
        grant = await self._grant(customer_id)
        if grant is not None:  # an operator's grant still wins for access
            self._fill(customer_id, Lookup(self._grant_entitlement(customer_id, grant)))
        return ent

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

    async def stored(self, customer_id: str) -> Entitlement | None:
        """The customer's stored entitlement, fresh or not (no Stripe call, no L1).
        Raises :class:`StoreError`."""
        return await self._store.get_entitlement(customer_id)

    async def link_customer(self, customer_id: str, email: str | None) -> None:
        """Remember that ``email`` pays as ``customer_id`` (Checkout completed, success page).
        Raises :class:`StoreError`."""
        await self._store.put_customer(customer_id, email)
        self._changed(customer_id)

    async def delete_customer(self, customer_id: str) -> None:
        """The customer is gone from Stripe (``customer.deleted``): forget its entitlement
        and its emails. Raises :class:`StoreError`."""
        await self._store.delete_entitlement(customer_id)
        await self._store.forget_customer(customer_id)
        self._changed(customer_id)

    async def customer_ids(self) -> list[str]:
        """Every customer the store knows (``gateway sync --all``). Raises :class:`StoreError`."""
        return await self._store.list_customers()

    async def grant(self, subject: str, until: datetime, note: str = "") -> None:
        """An operator's grant of access to a customer id or an email until ``until``; it
        wins over Stripe. Raises :class:`StoreError`."""
        await self._store.put_grant(subject, until, note)
        self._changed(None if "@" in subject else subject)

    async def revoke(self, subject: str) -> bool:
        """Remove the grant of a customer id or an email; whether there was one.
        Raises :class:`StoreError`."""
        removed = await self._store.delete_grant(subject)
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
            arrived = self._arrived.get(change.key)
            if arrived is not None:
                arrived.set()

    def _changed(self, customer_id: str | None) -> None:
        """The one place that learns of a change of a customer (None: of anyone, e.g. a grant
        to an email): drop what L1 holds for it, and so every verdict derived from that. The
        place to tell other replicas, too."""
        if customer_id is None:
            self._l1.clear()
            self._known.clear()
        else:
            self._l1.drop_customer(customer_id)
            self._known.pop(customer_id, None)
        self.changes.customer(customer_id)

    async def customers_for_email(self, email: str, *, fresh: bool = False) -> list[str]:
        """The Stripe customers with this email: from the store, else from Stripe (and then
        remembered; an empty answer for ``NEGATIVE_CACHE_TTL``). ``fresh``: ask Stripe now
        whatever the store remembers, and add the ones the store knows (a customer a Checkout
        made a moment ago counts: who may have a free trial). Raises :class:`StripeError`."""
        mail = normalize_email(email)
        if not mail:
            return []
        if fresh:
            found = await self._resolve_email(mail, email.strip())
            try:
                known = await self._store.customer_ids_for_email(mail)
            except StoreError as exc:
                log_event(
                    log, "store_read_failed", level=logging.WARNING, op="email", error=str(exc)
                )
                known = []
            return list(dict.fromkeys([*found, *known]))
        stored = await self._email_in_store(mail)
        if stored is not None:
            return stored
        resolve = functools.partial(self._resolve_email_leased, mail, email.strip())
        return await self._flight(f"mail:{mail}", resolve)

    async def close(self) -> None:
        """Cancel and await the in-flight lookups and Stripe reads. Idempotent."""
        self._closed = True
        tasks: list[asyncio.Task[Any]] = list(self._flights.values())
        tasks += [slot.driver for slot in self._syncs.values() if slot.driver is not None]
        for task in tasks:
            task.cancel()
        # A driver cancelled before it ran never settles its futures: do it for its waiters.
        for slot in self._syncs.values():
            for future in (slot.running, slot.queued):
                if future is not None:
                    future.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):  # already logged by the task's own handler
                log_event(log, "close_task_failed", level=logging.DEBUG, error=repr(result))

    # --- singleflight -------------------------------------------------------------------------

    async def _flight(self, key: str, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self._closed:  # shutting down: no new owned tasks, just do the work
            return await factory()
        task = self._flights.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(factory(), name=f"entitlement {key}")
            self._flights[key] = task
            task.add_done_callback(functools.partial(self._flight_done, key))
        else:
            self.stats.coalesced += 1
        # shield: one cancelled caller must not cancel the shared task for everyone else.
        return cast(T, await asyncio.shield(task))

    def _flight_done(self, key: str, task: "asyncio.Task[Any]") -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, StripeError):
            log_event(log, "lookup_failed", level=logging.ERROR, key=key, error=repr(exc))

    # --- the layers ---------------------------------------------------------------------------

    async def _load(self, identity: Identity) -> Lookup:
        """L1 miss for an identity: grant by email, resolve customers, best of their lookups."""
        key = identity.key
        if identity.email:
            grant = await self._grant(identity.email)
            if grant is not None:
                who = identity.customer_id or key
                lookup = Lookup(self._grant_entitlement(who, grant))
                self._fill(key, lookup, (identity.customer_id,) if identity.customer_id else ())
                return lookup
        if identity.customer_id:
            return await self._customer(identity.customer_id)
        if not identity.email:
            return Lookup(None)
        try:
            customers = await self.customers_for_email(identity.email)
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
        return await self._flight(
            f"cus:{customer_id}", functools.partial(self._load_customer, customer_id)
        )

    async def _load_customer(self, customer_id: str) -> Lookup:
        grant = await self._grant(customer_id)
        if grant is not None:
            lookup = Lookup(self._grant_entitlement(customer_id, grant))
            self._fill(customer_id, lookup)
            return lookup
        try:
            stored = await self._store.get_entitlement(customer_id)
        except StoreError as exc:
            log_event(log, "store_read_failed", level=logging.WARNING, op="get", error=str(exc))
            stored = self._known.get(customer_id)
            if stored is not None and stored.expires_at > self._now():
                self.stats.known_served += 1
                lookup = Lookup(stored)
                self._fill(customer_id, lookup)
                return lookup
        if stored is not None and stored.source == PAYLOAD_SOURCE:
            # Written from an event's payload during an outage: ask Stripe first (the breaker
            # bounds the attempts while it is still down), else serve that state as stored.
            return await self._payload_state(customer_id, stored)
        if stored is not None and stored.expires_at > self._now():
            self.stats.store_hits += 1
            lookup = Lookup(stored)
            self._fill(customer_id, lookup)
            return lookup
        try:
            ent = await self._leased_sync(customer_id, stored)
        except StripeUnavailable:
            return self._fallback(customer_id, stored, ERROR_UNAVAILABLE)
        except StripeRejected as exc:
            log_event(
                log, "stripe_rejected", level=logging.ERROR, customer=customer_id, error=str(exc)
            )
            return self._fallback(customer_id, stored, ERROR_REJECTED)
        return Lookup(ent)

    async def _leased_sync(self, customer_id: str, stored: Entitlement | None) -> Entitlement:
        """A cold customer's Stripe read, by one replica at a time (``leases``): without the
        lease, wait (bounded) for the holder's write to the store; with it, read Stripe. The
        lease store failing, or the wait ending, falls back to reading Stripe here."""
        if self._leases is None or self._closed:
            return await self._sync(customer_id, fresh=False)
        name = f"cus:{customer_id}"
        try:
            held = await self._leases.acquire(name)
        except StoreError as exc:
            log_event(log, "lease_failed", level=logging.WARNING, op="acquire", error=str(exc))
            return await self._sync(customer_id, fresh=False)
        if not held:
            ent = await self._await_holder(customer_id, stored, self._leases.wait)
            if ent is not None:
                return ent
            return await self._sync(customer_id, fresh=False)
        try:
            # The previous holder may have written it just before we got the lease.
            try:
                ent = await self._fresh_in_store(customer_id, stored)
            except StoreError as exc:
                log_event(log, "store_read_failed", level=logging.WARNING, error=str(exc))
                ent = None
            if ent is not None:
                return ent
            return await self._sync(customer_id, fresh=False)
        finally:
            try:
                await self._leases.release(name)
            except StoreError as exc:  # it expires by itself
                log_event(log, "lease_failed", level=logging.WARNING, op="release", error=str(exc))

    async def _resolve_email_leased(self, mail: str, as_given: str) -> list[str]:
        """:meth:`_resolve_email` by one replica at a time (``leases``), as for customers:
        without the lease, wait (bounded) for the holder's answer in the store."""
        if self._leases is None or self._closed:
            return await self._resolve_email(mail, as_given)
        name = f"mail:{mail}"
        try:
            held = await self._leases.acquire(name)
        except StoreError as exc:
            log_event(log, "lease_failed", level=logging.WARNING, op="acquire", error=str(exc))
            return await self._resolve_email(mail, as_given)
        if held:
            try:
                found = await self._email_in_store(mail)
                if found is not None:
                    return found
                return await self._resolve_email(mail, as_given)
            finally:
                try:
                    await self._leases.release(name)
                except StoreError as exc:  # it expires by itself
                    log_event(
                        log, "lease_failed", level=logging.WARNING, op="release", error=str(exc)
                    )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._leases.wait
        while loop.time() < deadline:
            await asyncio.sleep(min(_LEASE_POLL, max(deadline - loop.time(), 0.0)))
            found = await self._email_in_store(mail)
            if found is not None:
                self.stats.lease_waits += 1
                return found
        log_event(log, "lease_wait_ended", level=logging.INFO, email_lookup=True)
        return await self._resolve_email(mail, as_given)

    async def _email_in_store(self, mail: str) -> list[str] | None:
        """The email's customers as another replica stored them (or its remembered "none"
        within ``NEGATIVE_CACHE_TTL``), else None; a store failure is None (logged)."""
        try:
            ids = await self._store.customer_ids_for_email(mail)
            if ids:
                return ids
            cached = await self._store.email_lookup_cached(mail)
        except StoreError as exc:
            log_event(log, "store_read_failed", level=logging.WARNING, op="email", error=str(exc))
            return None
        if cached is not None and self._now() - cached[1] < self._negative_ttl:
            return cached[0]
        return None

    async def _fresh_in_store(
        self, customer_id: str, before: Entitlement | None
    ) -> Entitlement | None:
        """The customer's stored state if another replica wrote a fresh one since ``before``
        was read (then in L1 too), else None. Raises :class:`StoreError`."""
        ent = await self._store.get_entitlement(customer_id)
        if ent is None or ent.expires_at <= self._now() or ent == before:
            return None
        self.stats.lease_waits += 1
        self._fill(customer_id, Lookup(ent))
        return ent

    async def _await_holder(
        self, customer_id: str, before: Entitlement | None, wait: float
    ) -> Entitlement | None:
        """Another replica reads the customer from Stripe: its fresh state once in the store
        (woken by its change notification, else re-reading every ``_LEASE_POLL``), or None
        after ``wait`` seconds."""
        arrived = self._arrived.setdefault(customer_id, asyncio.Event())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(_LEASE_POLL, deadline - loop.time())):
                        await arrived.wait()
                arrived.clear()
                try:
                    ent = await self._fresh_in_store(customer_id, before)
                except StoreError as exc:
                    log_event(log, "store_read_failed", level=logging.WARNING, error=str(exc))
                    return None
                if ent is not None:
                    return ent
        finally:
            if self._arrived.get(customer_id) is arrived:
                del self._arrived[customer_id]
        log_event(log, "lease_wait_ended", level=logging.INFO, customer=customer_id)
        return None

    async def _payload_state(self, customer_id: str, stored: Entitlement) -> Lookup:
        """A stored state that came from a webhook's payload: Stripe's answer if it has one now,
        else the payload state while fresh (then stale-if-error, as any stored state)."""
        try:
            # Stamped no older than the payload, so this read replaces it (a read that starts
            # after the event was stored is truer than the event).
            read = self._sync(customer_id, fresh=False, event_created=stored.event_created)
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
            lookup = Lookup(stored)
            self._fill(customer_id, lookup)
            return lookup
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

    # --- grants -------------------------------------------------------------------------------

    async def _grant(self, subject: str) -> Grant | None:
        try:
            grant = await self._store.get_grant(subject)
        except StoreError as exc:
            log_event(log, "store_read_failed", level=logging.WARNING, op="grant", error=str(exc))
            return None
        if grant is None or grant.until <= self._now():
            return None
        return grant

    def _grant_entitlement(self, customer_id: str, grant: Grant) -> Entitlement:
        now = self._now()
        return Entitlement(
            customer_id=customer_id,
            status="active",
            checked_at=now,
            expires_at=min(grant.until, now + self._cache_ttl),
            period_end=grant.until,
            source="grant",
        )

    # --- Stripe reads -------------------------------------------------------------------------

    async def _sync(
        self, customer_id: str, *, fresh: bool, source: str = "stripe", event_created: int = 0
    ) -> Entitlement:
        """A Stripe read of the customer, written to store and L1. ``fresh``: one that starts
        after this call (else an in-flight one is good enough)."""
        if self._closed:
            return await self._sync_once(customer_id, source, event_created)
        slot = self._syncs.get(customer_id)
        if slot is None:
            slot = self._syncs[customer_id] = _SyncSlot()
        pending = slot.running if slot.running is not None else slot.queued
        if not fresh and pending is not None:
            self.stats.coalesced += 1
            return await asyncio.shield(pending)
        if slot.queued is None:
            slot.queued = asyncio.get_running_loop().create_future()
            slot.queued.add_done_callback(_consume)
            slot.source, slot.event_created = source, event_created
        else:
            self.stats.coalesced += 1
            if source != "stripe":
                slot.source = source
            slot.event_created = max(slot.event_created, event_created)
        future = slot.queued
        if slot.driver is None:
            slot.driver = asyncio.get_running_loop().create_task(
                self._drive(customer_id, slot), name=f"entitlement sync {customer_id}"
            )
        return await asyncio.shield(future)

    async def _drive(self, customer_id: str, slot: _SyncSlot) -> None:
        """Run the customer's queued reads one after the other."""
        try:
            while slot.queued is not None:
                future = slot.queued
                slot.queued, slot.running = None, future
                source, event_created = slot.source, slot.event_created
                try:
                    ent = await self._sync_once(customer_id, source, event_created)
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
            if self._syncs.get(customer_id) is slot:
                del self._syncs[customer_id]

    async def _stripe_call(self, call: Callable[[], Awaitable[T]]) -> T:
        """One Stripe read of this cache, counted in :attr:`stats` (made or skipped)."""
        try:
            result = await call()
        except StripeBreakerOpen:
            self.stats.breaker_skips += 1
            raise
        except BaseException:
            self.stats.stripe_calls += 1
            raise
        self.stats.stripe_calls += 1
        return result

    async def _read_product_features(self, product_id: str) -> list[dict[str, Any]]:
        return await self._stripe_call(
            functools.partial(self._stripe.list_product_features, product_id)
        )

    async def _customer_list(
        self, read: Callable[[str], Awaitable[list[dict[str, Any]]]], customer_id: str
    ) -> list[dict[str, Any]]:
        """``read(customer_id)`` from Stripe (one counted call); a customer gone from Stripe
        has nothing (``[]``): no subscription, no entitlement."""
        try:
            return await self._stripe_call(functools.partial(read, customer_id))
        except StripeRejected as exc:
            if not exc.not_found:
                raise
            return []

    async def _resolve_email(self, mail: str, as_given: str) -> list[str]:
        """Ask Stripe for the email's customers and remember the answer (even an empty one).

        Stripe matches emails case-sensitively: the address is asked as given, then lower-cased
        if that differs and found nothing (the gate itself creates customers lower-cased)."""
        found: list[dict[str, Any]] = []
        for query in dict.fromkeys((as_given, mail)):
            found = await self._stripe_call(functools.partial(self._stripe.find_customers, query))
            if found:
                break
        ids = [c["id"] for c in found if isinstance(c.get("id"), str)]
        try:
            for customer_id in ids:
                await self._store.put_customer(customer_id, mail)
            await self._store.put_email_lookup(mail, ids, self._now())
        except StoreError as exc:
            log_event(log, "store_write_failed", level=logging.WARNING, op="email", error=str(exc))
        return ids

    async def _sync_once(self, customer_id: str, source: str, event_created: int) -> Entitlement:
        """Read the customer's subscriptions from Stripe; write store and L1."""
        started = self._now()
        subscriptions = await self._customer_list(self._stripe.list_subscriptions, customer_id)
        stamp = max(event_created, int(started.timestamp()))
        now = self._now()
        ent = rules.summarize(
            customer_id, subscriptions, self._settings, now, source=source, event_created=stamp
        )
        if self._settings.feature_rules and rules.access(ent, self._settings, now).allowed:
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
        self._changed(customer_id)
        self._fill(customer_id, Lookup(ent))
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
