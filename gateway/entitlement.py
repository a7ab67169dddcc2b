"""What a user paid for: a layered cache in front of Stripe.

``lookup(identity)`` answers from the first layer that knows:

1. **L1** — an in-process LRU (``OrderedDict``) of :class:`~gateway.model.Lookup` per identity key
   and per customer, bounded by ``L1_MAX_ENTRIES``, each entry kept ``L1_TTL`` but never past the
   entitlement's own ``expires_at``. :meth:`Entitlements.lookup_cached` reads only this layer,
   synchronously: a hit costs no SQLite I/O and no Stripe call.
2. **Operator grants** (``gateway grant``) for the customer or the email: they take precedence.
3. **The store** — the last entitlement read from Stripe, while fresh (``expires_at > now``).
4. **Stripe** — ``list_subscriptions`` → :func:`gateway.rules.summarize` → store + L1. Non-payers
   are cached too (``NEGATIVE_CACHE_TTL``, set by ``summarize``), as are emails without a
   customer (the email → customers lookup is remembered in the store).

Concurrency: N concurrent misses for one identity, customer or email share one task
(singleflight); the shared task is shielded, so a cancelled caller does not cancel the others,
and it is owned by this object (cancelled and awaited by :meth:`Entitlements.close`). Stripe
reads of one customer are also serialized: a :meth:`~Entitlements.refresh` (webhook, checkout
success) always gets a read that *started after* it was asked for, joining an already queued one
if there is, so three webhooks for one checkout cost at most two reads and the newest read is
the one written last.

Failures: a transient Stripe failure serves the last stored state if it was read within
``STALE_IF_ERROR`` (``Lookup(stale=True)``), else ``Lookup(None, error="stripe_unavailable")``.
After :data:`BREAKER_THRESHOLD` consecutive transient failures a circuit breaker skips Stripe
for :data:`BREAKER_COOLDOWN` seconds, then lets one probe through (half-open). A customer
Stripe no longer knows (404) has no subscription. A store failure is logged and treated as a
miss: Stripe still answers.

Ordering with webhooks: every Stripe read is written with ``event_created`` = max(the event's
``created``, the read's start time), and only if not older than what is stored. So an event
applied from its payload while Stripe is down (:meth:`~Entitlements.apply_if_newer`) is never
overwritten by an older read, and a late, older event never overwrites a newer read.
"""

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar, cast

from gateway import rules
from gateway.logs import log_event
from gateway.model import Entitlement, Identity, Lookup, utcnow
from gateway.settings import Settings
from gateway.store import Grant, Store, StoreError, normalize_email
from gateway.stripe_api import StripeAPI, StripeError, StripeRejected, StripeUnavailable

log = logging.getLogger("gateway.entitlement")

T = TypeVar("T")

#: Consecutive transient Stripe failures that open the circuit breaker.
BREAKER_THRESHOLD = 5
#: Seconds the breaker stays open before one probe call is let through.
BREAKER_COOLDOWN = 30.0

ERROR_UNAVAILABLE = "stripe_unavailable"
ERROR_REJECTED = "stripe_rejected"

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Stops calling a failing Stripe for a while.

    closed → (``threshold`` consecutive failures) → open → (``cooldown`` elapsed) → half_open:
    one probe call is allowed; its success closes the breaker, its failure re-opens it. State
    changes are logged once each.
    """

    def __init__(
        self,
        threshold: int = BREAKER_THRESHOLD,
        cooldown: float = BREAKER_COOLDOWN,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.threshold = threshold
        self.cooldown = timedelta(seconds=cooldown)
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at: datetime | None = None
        self._probing = False
        self.opened = 0  # times opened, for metrics

    @property
    def state(self) -> BreakerState:
        if (
            self._state == "open"
            and self._opened_at is not None
            and self._clock() >= self._opened_at + self.cooldown
        ):
            self._set("half_open")
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to Stripe now (in half-open state: the one probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state != "closed":
            self._opened_at = None
            self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self._state == "half_open" or (
            self._state == "closed" and self._failures >= self.threshold
        ):
            self._opened_at = self._clock()
            self.opened += 1
            self._set("open")

    def release(self) -> None:
        """A call ended without a verdict (cancelled): let another probe through."""
        self._probing = False

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            level = logging.WARNING if state == "open" else logging.INFO
            log_event(
                log,
                "stripe_breaker",
                level=level,
                state=state,
                failures=self._failures,
                cooldown_s=self.cooldown.total_seconds(),
            )


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

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True, eq=False)
class L1Entry:
    """One L1 entry: a lookup, until when it may be served, and what invalidates it."""

    lookup: Lookup
    until: datetime
    customers: tuple[str, ...]  # customers the entry depends on; () for "no customer"
    # Cleared when the entry leaves the cache (dropped, replaced, evicted, expired), so what a
    # caller derived from it (see :meth:`Entitlements.hold`) is known void without a lookup.
    live: bool = True


@dataclass(frozen=True, slots=True)
class L1Hold:
    """A caller's handle on the L1 entry behind a lookup (see :meth:`Entitlements.hold`).

    Something derived from the lookup (the gate's allowed verdict of a session) is as good as
    the entry while ``entry.live`` and before ``until``; ``touch()`` counts as a use of the
    entry for the LRU order, as a cache hit would.
    """

    entry: L1Entry
    until: float  # Unix seconds (time.time()): the end of the entry's L1 lifetime
    touch: Callable[[], None]


class _L1:
    """A bounded LRU of lookups with an index customer → keys, so invalidating a customer does
    not scan the whole cache."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, L1Entry] = OrderedDict()
        self._by_customer: dict[str, set[str]] = {}
        self._unmapped: set[str] = set()  # entries saying "no customer" (emails)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: datetime) -> Lookup | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.until:
            self.drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.lookup

    def put(self, key: str, entry: L1Entry) -> None:
        self.drop(key)
        self._entries[key] = entry
        for customer_id in entry.customers:
            self._by_customer.setdefault(customer_id, set()).add(key)
        if not entry.customers:
            self._unmapped.add(key)
        while len(self._entries) > self._max:
            self.drop(next(iter(self._entries)))

    def peek(self, key: str) -> L1Entry | None:
        """The entry under ``key``, expired or not; no recency update."""
        return self._entries.get(key)

    def toucher(self, key: str) -> Callable[[], None]:
        """A callable that marks ``key`` recently used (valid while its entry is live)."""
        return functools.partial(self._entries.move_to_end, key)

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        entry.live = False
        for customer_id in entry.customers:
            keys = self._by_customer.get(customer_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_customer[customer_id]
        self._unmapped.discard(key)

    def drop_customer(self, customer_id: str) -> None:
        """Entries of and depending on the customer, and every "no customer" entry (the
        customer may be new for one of those emails)."""
        keys = {customer_id} | self._by_customer.get(customer_id, set()) | self._unmapped
        for key in keys:
            self.drop(key)


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

    def __init__(
        self,
        settings: Settings,
        store: Store,
        stripe: StripeAPI,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._store = store
        self._stripe = stripe
        self._clock = clock
        self._l1 = _L1(settings.l1_max_entries)
        self._l1_ttl = timedelta(seconds=settings.l1_ttl)
        self._stale = timedelta(seconds=settings.stale_if_error)
        self._negative_ttl = timedelta(seconds=settings.negative_cache_ttl)
        self._cache_ttl = timedelta(seconds=settings.cache_ttl)
        self._flights: dict[str, asyncio.Task[Any]] = {}
        self._syncs: dict[str, _SyncSlot] = {}
        self._closed = False
        self.breaker = CircuitBreaker(clock=clock)
        self.stats = EntitlementStats()

    # --- public API ---------------------------------------------------------------------------

    def lookup_cached(self, identity: Identity) -> Lookup | None:
        """The L1 answer for ``identity``, or None on a miss. No I/O: for the hot path."""
        lookup = self._l1.get(identity.key, self._clock())
        if lookup is not None:
            self.stats.l1_hits += 1
        return lookup

    def hold(self, identity: Identity, lookup: Lookup) -> L1Hold | None:
        """A handle on the L1 entry that holds ``lookup`` (or an equal one) for ``identity``;
        None when that is not what L1 holds (anymore), or when this cache runs on an injected
        clock (a hold is compared with ``time.time()``). No I/O, no stats.

        The entry dies (``hold.entry.live`` turns False) whenever it leaves L1: replaced by a
        new read, dropped by :meth:`forget` / :meth:`refresh` / :meth:`apply_if_newer` (webhooks),
        evicted, or found expired; ``hold.until`` is its L1 end, so a caller never outlives it.
        """
        if self._clock is not utcnow:
            return None
        key = identity.key
        entry = self._l1.peek(key)
        if (
            entry is None
            or not entry.live
            or (entry.lookup is not lookup and entry.lookup != lookup)
        ):
            return None
        return L1Hold(entry, entry.until.timestamp(), self._l1.toucher(key))

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
        """Store ``ent`` (built from a webhook's payload while Stripe is unreachable) unless a
        newer state is stored. Raises :class:`StoreError`."""
        applied = await self._store.put_entitlement_if_newer(ent)
        if applied:
            self.forget(ent.customer_id)
        return applied

    def forget(self, customer_id: str) -> None:
        """Drop the customer from L1 (and identities that depend on it, and cached "no
        customer for this email" answers), so the next lookup reads the store."""
        self._l1.drop_customer(customer_id)

    async def customers_for_email(self, email: str) -> list[str]:
        """The Stripe customers with this email: from the store, else from Stripe (and then
        remembered; an empty answer for ``NEGATIVE_CACHE_TTL``). Raises :class:`StripeError`."""
        mail = normalize_email(email)
        if not mail:
            return []
        try:
            ids = await self._store.customer_ids_for_email(mail)
            if ids:
                return ids
            cached = await self._store.email_lookup_cached(mail)
        except StoreError as exc:
            log_event(log, "store_read_failed", level=logging.WARNING, op="email", error=str(exc))
            cached = None
        if cached is not None and self._clock() - cached[1] < self._negative_ttl:
            return cached[0]
        resolve = functools.partial(self._resolve_email, mail, email.strip())
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
        hit = self._l1.get(customer_id, self._clock())
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
            stored = None
        if stored is not None and stored.expires_at > self._clock():
            self.stats.store_hits += 1
            lookup = Lookup(stored)
            self._fill(customer_id, lookup)
            return lookup
        try:
            ent = await self._sync(customer_id, fresh=False)
        except StripeUnavailable:
            return self._fallback(customer_id, stored, ERROR_UNAVAILABLE)
        except StripeRejected as exc:
            log_event(
                log, "stripe_rejected", level=logging.ERROR, customer=customer_id, error=str(exc)
            )
            return self._fallback(customer_id, stored, ERROR_REJECTED)
        return Lookup(ent)

    def _fallback(self, customer_id: str, stored: Entitlement | None, error: str) -> Lookup:
        """Stripe failed: the stored state if recent enough (stale-if-error), else an error."""
        now = self._clock()
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
        now = self._clock()
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
        if grant is None or grant.until <= self._clock():
            return None
        return grant

    def _grant_entitlement(self, customer_id: str, grant: Grant) -> Entitlement:
        now = self._clock()
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

    async def _guarded(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """One Stripe call through the circuit breaker."""
        if not self.breaker.allow():
            self.stats.breaker_skips += 1
            raise StripeUnavailable(
                f"stripe {operation} skipped: circuit breaker open", operation=operation
            )
        self.stats.stripe_calls += 1
        try:
            result = await call()
        except StripeUnavailable as exc:
            self.breaker.failure()
            log_event(log, "stripe_unavailable", level=logging.WARNING, error=str(exc))
            raise
        except StripeRejected:
            self.breaker.success()  # Stripe answered; the caller decides what a "no" means
            raise
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        return result

    async def _resolve_email(self, mail: str, as_given: str) -> list[str]:
        """Ask Stripe for the email's customers and remember the answer (even an empty one).

        Stripe matches emails case-sensitively: the address is asked as given, then lower-cased
        if that differs and found nothing (the gate itself creates customers lower-cased)."""
        found: list[dict[str, Any]] = []
        for query in dict.fromkeys((as_given, mail)):
            found = await self._guarded(
                "customers.list", functools.partial(self._stripe.find_customers, query)
            )
            if found:
                break
        ids = [c["id"] for c in found if isinstance(c.get("id"), str)]
        try:
            for customer_id in ids:
                await self._store.put_customer(customer_id, mail)
            await self._store.put_email_lookup(mail, ids, self._clock())
        except StoreError as exc:
            log_event(log, "store_write_failed", level=logging.WARNING, op="email", error=str(exc))
        return ids

    async def _sync_once(self, customer_id: str, source: str, event_created: int) -> Entitlement:
        """Read the customer's subscriptions from Stripe; write store and L1."""
        started = self._clock()
        try:
            subscriptions = await self._guarded(
                "subscriptions.list",
                functools.partial(self._stripe.list_subscriptions, customer_id),
            )
        except StripeRejected as exc:
            if not exc.not_found:
                raise
            subscriptions = []  # the customer is gone from Stripe: no subscription
        stamp = max(event_created, int(started.timestamp()))
        ent = rules.summarize(
            customer_id,
            subscriptions,
            self._settings,
            self._clock(),
            source=source,
            event_created=stamp,
        )
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
        self.forget(customer_id)
        self._fill(customer_id, Lookup(ent))
        return ent

    # --- L1 -----------------------------------------------------------------------------------

    def _fill(self, key: str, lookup: Lookup, customers: tuple[str, ...] | None = None) -> None:
        if lookup.error is not None:
            return  # errors are not cached: the breaker already keeps Stripe from being hammered
        now = self._clock()
        until = now + self._l1_ttl
        ent = lookup.entitlement
        if ent is None:
            until = min(until, now + self._negative_ttl)
        elif lookup.stale:
            until = min(until, ent.checked_at + self._stale)
        else:
            until = min(until, ent.expires_at)
        if until <= now:
            return
        deps = customers if customers is not None else (key,)
        self._l1.put(key, L1Entry(lookup, until, deps))
