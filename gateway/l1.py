"""The entitlement cache's in-process layer: L1 lookups and the verdicts derived from them.

Both are owned by :class:`gateway.entitlement.Entitlements` (nothing else writes them) and read
the one injected :class:`~gateway.model.Clock`, so tests on a manual clock run this code as
production does.

:class:`L1` is a bounded LRU (``OrderedDict``) of :class:`~gateway.model.Lookup` per identity
key and per customer, with an index customer → keys so invalidating a customer does not scan
the whole cache. Each entry has an end (Unix seconds) and a ``live`` flag that turns False the
moment it leaves the cache (dropped, replaced, evicted, found expired).

:class:`Verdicts` remembers the gate's *allowed* verdicts per raw ``Cookie`` header (cookie
sessions) and per trusted identity-header value (users an auth proxy names), the hot path of a
paying user: their requests all carry the same header, and the answer (allowed, with these
``X-Gate-*`` headers) depends only on that header, on the user's L1 entry and on the time. The
two are kept apart (a cookie header is never looked up as an identity-header value), and the
gate asks for an identity-header verdict only when the peer is trusted. A remembered verdict is
used only while

- the L1 entry it was derived from is still *the* cached one (``live``): a new Stripe read,
  ``forget`` / ``refresh`` / ``apply_if_newer`` / any other change of the customer, eviction and
  expiry all end it at once;
- the session cache entry it was derived from (:class:`gateway.sessions.SessionEntry`) is
  still live: a local revocation (sign-out, sign out everywhere), eviction and expiry end it at
  once (an identity-header user has no session: the auth proxy in front owns their sign-in);
- the time is before its end: the earliest of the L1 entry's end (``L1_TTL``, never past the
  entitlement's cache lifetime), the session cache entry's end (``L1_TTL`` after the session
  was read from the store: so a revocation on another worker stops it within ``L1_TTL``) and
  what the caller says (the end of the access itself);
- the path's required feature (``FEATURE_RULES``), if any, is among the features remembered
  with the verdict (one frozenset membership; a path needing another feature misses and is
  decided — and refused — on the slow path).

A verdict hit keeps the L1 entry recently used, as an ordinary hit would. These dicts are kept
by hand, not with ``functools.lru_cache``: entries die on invalidation, not only on age or size,
and the benchmark's cached paying request is a dict lookup and a clock read.
"""

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.model import Clock, Lookup, Pass, RememberedBy

__all__ = ["L1", "MAX_VERDICTS", "Guard", "L1Entry", "Verdicts"]

#: Remembered verdicts per process (distinct ``Cookie`` headers; as many distinct
#: identity-header values); the oldest goes first.
MAX_VERDICTS = 4096


@dataclass(slots=True, eq=False)
class L1Entry:
    """One L1 entry: a lookup, until when it may be served, and what invalidates it."""

    lookup: Lookup
    until: float  # Unix seconds (Clock.time())
    customers: tuple[str, ...]  # customers the entry depends on; () for "no customer"
    # Cleared when the entry leaves the cache, so a verdict derived from it is known void
    # without a lookup.
    live: bool = True


class L1:
    """A bounded LRU of lookups (see the module docstring)."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._max = max_entries
        self._time = clock.time
        self._entries: OrderedDict[str, L1Entry] = OrderedDict()
        self._by_customer: dict[str, set[str]] = {}
        self._unmapped: set[str] = set()  # entries saying "no customer" (emails)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Lookup | None:
        """The live lookup under ``key`` (now recently used), or None; drops it if expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._time() >= entry.until:
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

    def toucher(self) -> Callable[[str], None]:
        """``touch(key)``: mark a present ``key`` recently used (the dict's own method: no
        Python frame on the hot path)."""
        return self._entries.move_to_end

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

    def clear(self) -> None:
        """Drop every entry (a change that may concern anyone)."""
        for entry in self._entries.values():
            entry.live = False
        self._entries.clear()
        self._by_customer.clear()
        self._unmapped.clear()

    def drop_customer(self, customer_id: str) -> None:
        """Entries of and depending on the customer, and every "no customer" entry (the
        customer may be new for one of those emails)."""
        keys = {customer_id} | self._by_customer.get(customer_id, set()) | self._unmapped
        for key in keys:
            self.drop(key)


class Guard(Protocol):
    """What a verdict rests on besides its L1 entry (a session cache entry): dead once
    ``live`` is False, and never past ``until``."""

    live: bool
    until: float


class HitCounter(Protocol):
    """Where verdict hits are counted (the owner's ``EntitlementStats``: as L1 hits)."""

    l1_hits: int


# (the verdict handed out, the L1 entry, the guard, the L1 key)
_Kept = tuple[Pass, L1Entry, Guard, str]
_NO_FEATURES: frozenset[str] = frozenset()


class Verdicts:
    """Allowed verdicts by raw ``Cookie`` header, and by trusted identity-header value, each
    resting on one L1 entry and one guard (the two are separate: a value is never looked up
    as the other)."""

    __slots__ = (
        "_clock",
        "_cookies",
        "_headers",
        "_l1",
        "_label",
        "_max",
        "_stats",
        "_time",
        "_touch",
    )

    def __init__(
        self,
        l1: L1,
        clock: Clock,
        stats: HitCounter,
        max_entries: int = MAX_VERDICTS,
        label: RememberedBy = "cookie",
    ) -> None:
        self._clock = clock
        self._label: RememberedBy = label
        self._cookies: dict[str, _Kept] = {}
        self._headers: dict[str, _Kept] = {}
        self._stats = stats
        self._l1 = l1
        self._max = max_entries
        self._time = clock.time
        self._touch = l1.toucher()

    def __len__(self) -> int:
        return len(self._cookies) + len(self._headers)

    def sibling(self, label: RememberedBy) -> "Verdicts":
        """Verdicts of another kind of credential (``label``: what their ``Pass.remembered``
        says, e.g. ``"key"`` for API keys) on the same L1 entries: kept apart from these, so a
        value is never looked up as another kind."""
        return Verdicts(self._l1, self._clock, self._stats, self._max, label)

    def remembered(self, key: str, feature: str | None = None, header: bool = False) -> Pass | None:
        """The still-valid verdict for this ``Cookie`` header (``header``: for this trusted
        identity-header value) on a path needing ``feature`` (None: no feature), counted as
        an L1 hit; else None (a dead one is forgotten; one without the feature is kept for
        the other paths)."""
        entries = self._headers if header else self._cookies
        kept = entries.get(key)
        if kept is None:
            return None
        verdict, entry, guard, l1_key = kept
        if feature is not None and feature not in verdict.features:
            return None
        if entry.live and guard.live and self._time() < verdict.until:
            self._touch(l1_key)  # live: the key is in L1
            self._stats.l1_hits += 1
            return verdict
        del entries[key]
        return None

    def put(
        self,
        key: str,
        l1_key: str,
        lookup: Lookup,
        headers: Mapping[str, str],
        until: float,
        guard: Guard,
        features: frozenset[str] = _NO_FEATURES,
        *,
        header: bool = False,
    ) -> Pass:
        """Remember ``headers`` (and the customer's ``features``) for the ``Cookie`` header
        ``key`` (``header``: the identity-header value) until ``until`` at the latest, when
        ``lookup`` (or an equal one) is what L1 holds under ``l1_key`` and ``guard`` (the
        session cache entry the identity came from) is live; never past either one's end.

        Returns the verdict to hand out: its ``remembered`` says whether (and as what) it was
        kept."""
        # Read-only (shared between requests), and the fastest source for the proxy's
        # CIMultiDict.update.
        shared = CIMultiDictProxy(CIMultiDict(headers))
        entry = self._l1.peek(l1_key)
        if (
            entry is None
            or not entry.live
            or (entry.lookup is not lookup and entry.lookup != lookup)
            or not guard.live
        ):
            return Pass(shared, entitlement=lookup.entitlement)
        until = min(until, entry.until, guard.until)
        if until <= self._time():
            return Pass(shared, entitlement=lookup.entitlement)
        entries = self._headers if header else self._cookies
        entries.pop(key, None)
        while len(entries) >= self._max:
            del entries[next(iter(entries))]
        verdict = Pass(
            shared, "header" if header else self._label, until, features, lookup.entitlement
        )
        entries[key] = (verdict, entry, guard, l1_key)
        return verdict

    def clear(self) -> None:
        self._cookies.clear()
        self._headers.clear()
