"""API keys as an identity: issue, list, revoke and roll them; resolve a request's key to its
customer from an in-process cache, cheaply enough for every request.

- **Which header**: ``API_KEY_HEADER`` (default ``Authorization``: ``Bearer gk_…``; any
  other ``Authorization`` — Basic, someone else's bearer token — is the app's, not a key).
  A key sent twice (the header repeated) is refused: a proxy and the gate must never read
  different keys from one request.
- **Refused before the store**: a key that is not :func:`~gateway.apikeys.format.well_formed`
  (wrong prefix or mode, length, alphabet, checksum) is answered ``401 invalid_api_key``
  without a lookup. The same answer for unknown, expired and revoked keys: nothing is learned.
- **Cache**: entries keyed by the key (a dict: Python's per-process randomized string hash),
  each living at most :data:`REVOCATION_BOUND` (1 s) and never past the key's expiry or
  scheduled revocation, on the services' one clock. So a revocation reaches every worker and
  replica within 1 s even without a bus (SQLite with ``WORKERS``, the CLI); on this worker at
  once; on PostgreSQL the replica bus carries it as a ``session`` change naming the key's
  hash (:meth:`ApiKeys.on_remote`), and :mod:`gateway.watch` re-checks that customer's open
  sockets. A refill reads one row (indexed on the hash) and compares the SHA-256 digests in
  constant time.
- **Remembered verdicts**: allowed verdicts per key (:class:`gateway.l1.Verdicts`, apart from
  the cookie and identity-header ones), resting on the customer's L1 entry and on the key's
  cache entry (whose ``live`` ends at revocation here, and whose end is at most 1 s away).
- **Rate limit** (``API_KEY_RATE``, ``API_KEY_BURST``): a token bucket per key *per worker*
  (N workers let a key through N times as fast): beyond it ``429`` with ``Retry-After``.
- ``last_used`` is written when an entry is refilled and the stored value is at least
  :data:`TOUCH_EVERY` old: at most once a minute per key per worker.
"""

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from multidict import CIMultiDictProxy

from gateway.apikeys.config import parse_rate
from gateway.apikeys.format import (
    KEY_PATTERN,
    digest_matches,
    key_hash,
    key_start,
    new_key,
    new_key_id,
    well_formed,
)
from gateway.changes import Change, Changes
from gateway.l1 import Verdicts
from gateway.livecache import LiveCache
from gateway.logs import log_event
from gateway.model import Clock, Denial, Identity, Pass
from gateway.settings import Settings
from gateway.store.api_keys import ApiKeyRow, ApiKeyRows, TooManyKeys
from gateway.store.base import SQL as KeyStore
from gateway.store.base import StoreError

__all__ = [
    "INVALID_KEY",
    "KEY_IN_URL",
    "REVOCATION_BOUND",
    "TOUCH_EVERY",
    "ApiKeys",
    "KeyEntry",
    "TooManyKeys",
    "key_in_url",
]

log = logging.getLogger("gateway.apikeys")

#: Seconds a worker may believe a key it read from the store (revocation and expiry reach
#: every worker and replica within this, bus or not).
REVOCATION_BOUND = 1.0
#: ``last_used`` is written at most this often per key and worker (seconds).
TOUCH_EVERY = 60.0
#: Key cache entries (distinct keys, good or bad) per process.
KEY_CACHE_SIZE = 4096
_BUCKETS_MAX = 4096

#: The one answer for every key that does not let anyone in (malformed, bad checksum,
#: unknown, expired, revoked, sent twice).
INVALID_KEY = Denial("api_key", 401, "invalid_api_key")
#: A key in the URL's query string (it would end up in access logs and browser histories).
KEY_IN_URL = Denial("api_key", 400, "api_key_in_url")
_UNAVAILABLE = Denial("unavailable", 503, "billing_unavailable", retry_after=30)
_BEARER = "bearer "


@dataclass(slots=True, eq=False)
class KeyEntry:
    """One key cache entry: who the key names (None: nobody — unknown, expired, revoked),
    until when this worker may believe it, and whether it is still *the* entry (``live``
    turns False the moment it leaves the cache; the verdicts resting on it test it)."""

    identity: Identity | None
    key_id: str
    key_hash: str
    until: float  # Unix seconds (Clock.time())
    live: bool = True
    #: Until when it may be kept while the store cannot be read (Unix seconds).
    grace: float = 0.0


class _Bucket:
    """A token bucket: ``rate`` per second, at most ``burst``."""

    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class ApiKeys:
    """The keys of every customer, and the cache that resolves them (see the module
    docstring). ``clock`` and ``changes`` are the services' one clock and announcer;
    ``verdicts`` the entitlement cache's (a sibling for keys is made from it)."""

    def __init__(
        self,
        settings: Settings,
        store: KeyStore,
        clock: Clock,
        changes: Changes,
        verdicts: Verdicts,
        *,
        max_entries: int = KEY_CACHE_SIZE,
    ) -> None:
        self._rows = ApiKeyRows(store)
        self._clock = clock
        self._time = clock.time
        self._changes = changes
        self._live = settings.live_key
        self.header = settings.api_key_header
        self._bearer = settings.api_key_header.lower() == "authorization"
        self._ttl = min(float(settings.l1_ttl), REVOCATION_BOUND)
        self._stale = float(settings.stale_if_error)
        self.max_per_customer = settings.max_api_keys_per_customer
        self._rate = parse_rate(settings.api_key_rate)
        self._burst = float(max(settings.api_key_burst, 1))
        self._buckets: dict[str, _Bucket] = {}
        self._cache: LiveCache[KeyEntry] = LiveCache(max_entries)
        #: Allowed verdicts per key (``Pass.remembered == "key"``).
        self.verdicts = verdicts.sibling("key")
        #: Store reads and ``last_used`` writes done by this cache (tests, metrics).
        self.reads = 0
        self.touches = 0
        changes.listen(self.on_remote)

    def __len__(self) -> int:
        return len(self._cache)

    # --- the request path ---------------------------------------------------------------------

    def credential(self, headers: CIMultiDictProxy[str] | Mapping[str, str]) -> str | None:
        """The key a request carries in ``API_KEY_HEADER`` (None: no key; the request is
        decided by its cookie or identity header). A repeated header that carries a key
        comes back as ``""`` (refused as invalid)."""
        if not isinstance(headers, CIMultiDictProxy):
            raw = headers.get(self.header)
            return None if raw is None else self._key_of(raw)
        values = headers.getall(self.header, None)
        if values is None:
            return None
        if len(values) == 1:
            return self._key_of(values[0])
        return "" if any(self._key_of(v) is not None for v in values) else None

    def _key_of(self, raw: str) -> str | None:
        if not self._bearer:
            return raw.strip()
        if raw[:7].lower() != _BEARER:
            return None  # Basic, or no scheme: the app's own
        # Spaces and tabs only (not str.strip's Unicode spaces): what the shipped nginx and
        # Caddy configs strip as a key (``bearer\s+gk_``) is all the gate takes as one.
        key = raw[7:].strip(" \t")
        return key if key.startswith("gk_") else None  # another bearer token: the app's

    def remembered(self, key: str, feature: str | None) -> Pass | Denial | None:
        """The remembered verdict for ``key`` (no I/O), rate-limited; None: decide."""
        verdict = self.verdicts.remembered(key, feature)
        if verdict is None:
            return None
        return self._limited(key) or verdict

    def _limited(self, key: str) -> Denial | None:
        """None if the key may make one more request now, else its 429."""
        if not self._rate:
            return None
        now = self._time()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _BUCKETS_MAX:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        wait = max(1, math.ceil((1.0 - bucket.tokens) / self._rate))
        return Denial("rate_limited", 429, "rate_limited", retry_after=wait)

    async def resolve(self, key: str) -> KeyEntry | Denial:
        """The cache entry of a working ``key`` (its ``identity`` acts as the customer), or
        the denial: :data:`INVALID_KEY`, a 429, or 503 when the store cannot be read for a key
        not seen before."""
        entry = self._cache.get(key)
        if entry is not None:
            if self._time() < entry.until:
                self._cache.used(key)
                if entry.identity is None:
                    return INVALID_KEY
                return self._limited(key) or entry
            self._cache.drop(key)
        ended = entry
        if not well_formed(key, self._live):
            return INVALID_KEY  # no store read, no cache entry: nothing to fill the cache with
        handle = key_hash(key)
        for _ in range(3):
            generation = self._cache.generation
            try:
                row = await self._rows.by_hash(handle)
            except StoreError as exc:
                log_event(log, "api_key_read_failed", level=logging.WARNING, error=str(exc))
                kept = self._kept(key, ended if generation == self._cache.generation else None)
                return kept if kept is not None else _UNAVAILABLE
            self.reads += 1
            if generation != self._cache.generation:
                continue  # a revocation overlapped the read: read again
            filled = await self._fill(key, handle, row)
            if filled.identity is None:
                return INVALID_KEY
            return self._limited(key) or filled
        return INVALID_KEY

    async def _fill(self, key: str, handle: str, row: ApiKeyRow | None) -> KeyEntry:
        now = self._clock.now()
        t = now.timestamp()
        if row is None or not digest_matches(key, row.key_hash) or not row.active(now):
            entry = KeyEntry(None, row.id if row else "", handle, t + self._ttl)
            self._cache.put(key, entry)
            return entry
        ends = row.ends_at()
        end = ends.timestamp() if ends is not None else math.inf
        identity = Identity(None, row.customer_id, "key")
        entry = KeyEntry(
            identity, row.id, handle, min(t + self._ttl, end), grace=min(t + self._stale, end)
        )
        self._cache.put(key, entry)
        if row.last_used is None or t - row.last_used.timestamp() >= TOUCH_EVERY:
            try:
                await self._rows.touch(row.id, now)
                self.touches += 1
            except StoreError as exc:  # only last_used is lost; the key works
                log_event(log, "api_key_touch_failed", level=logging.WARNING, error=str(exc))
        return entry

    def _kept(self, key: str, ended: KeyEntry | None) -> KeyEntry | None:
        """The store cannot be read: the entry that just ended, for another bound within its
        grace (``STALE_IF_ERROR``, never past the key's end), else None."""
        if ended is None or ended.identity is None:
            return None
        now = self._time()
        if now >= ended.grace:
            return None
        entry = KeyEntry(
            ended.identity,
            ended.key_id,
            ended.key_hash,
            min(now + self._ttl, ended.grace),
            grace=ended.grace,
        )
        self._cache.put(key, entry)
        return entry

    def on_remote(self, change: Change) -> None:
        """A :class:`Changes` listener: a key revoked on another replica (a ``session`` change
        naming its hash) is refused here at once; ``everyone`` empties the cache."""
        if not change.remote:
            return
        if change.kind == "session" and change.key:
            self._cache.forget(lambda e: e.key_hash == change.key)
        elif change.kind == "everyone":
            self._cache.forget(lambda e: True)

    # --- issuing, listing, revoking -----------------------------------------------------------

    async def create(
        self, customer_id: str, name: str, expires_in: timedelta | None = None
    ) -> tuple[str, ApiKeyRow]:
        """A new key for ``customer_id``: the key (shown once, never stored) and its row.
        Raises :class:`TooManyKeys` at ``MAX_API_KEYS_PER_CUSTOMER``, or StoreError."""
        return await self._create(customer_id, name, expires_in, self.max_per_customer)

    async def _create(
        self, customer_id: str, name: str, expires_in: timedelta | None, limit: int
    ) -> tuple[str, ApiKeyRow]:
        key = new_key(self._live)
        now = self._clock.now()
        row = ApiKeyRow(
            id=new_key_id(),
            key_hash=key_hash(key),
            customer_id=customer_id,
            name=name.strip()[:100] or "API key",
            start=key_start(key),
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
            last_used=None,
            revoked_at=None,
        )
        await self._rows.create(row, limit)
        log_event(log, "api_key_created", customer=customer_id, key=row.id)
        return key, row

    async def of_customer(self, customer_id: str) -> list[ApiKeyRow]:
        """The customer's working keys, newest first. Raises StoreError."""
        return await self._rows.of_customer(customer_id, self._clock.now())

    async def get(self, key_id: str) -> ApiKeyRow | None:
        return await self._rows.by_id(key_id)

    async def revoke(
        self, key_id: str, customer_id: str | None = None, after: timedelta = timedelta(0)
    ) -> ApiKeyRow | None:
        """Make the key stop working (``after`` 0: now; else at the end of that overlap); only
        a key of ``customer_id`` when given. The row if it was working, else None. This worker
        refuses it at once; every other one within :data:`REVOCATION_BOUND` (1 s), the other
        replicas at once through the bus."""
        if customer_id is not None:
            row = await self._rows.by_id(key_id)
            if row is None or row.customer_id != customer_id:
                return None
        now = self._clock.now()
        row = await self._rows.revoke(key_id, now + after, now)
        if row is None:
            return None
        log_event(
            log,
            "api_key_revoked",
            customer=row.customer_id,
            key=row.id,
            after=int(after.total_seconds()),
        )
        # Entries here and on the other replicas are dropped, so the next request reads the
        # new end (now, or the end of the overlap).
        self._cache.forget(lambda e: e.key_hash == row.key_hash)
        self._changes.session(row.key_hash, row.customer_id)
        return row

    async def roll(
        self, key_id: str, customer_id: str | None, overlap: timedelta
    ) -> tuple[str, ApiKeyRow] | None:
        """A new key in place of ``key_id`` (same name; the same lifetime from now, if it had
        one); the old one keeps working for ``overlap`` (0: stops now). None if ``key_id`` is
        not a working key (of ``customer_id``, when given)."""
        old = await self._rows.by_id(key_id)
        now = self._clock.now()
        if old is None or not old.active(now):
            return None
        if customer_id is not None and old.customer_id != customer_id:
            return None
        lifetime = old.expires_at - old.created_at if old.expires_at is not None else None
        # The old key still counts until it ends: one more than the limit for the overlap.
        made = await self._create(old.customer_id, old.name, lifetime, self.max_per_customer + 1)
        await self.revoke(old.id, None, overlap)
        return made


def key_in_url(raw_path: str) -> bool:
    """Whether a request target carries something shaped like a key in its query string."""
    _, _, query = raw_path.partition("?")
    return bool(query) and KEY_PATTERN.search(query) is not None
