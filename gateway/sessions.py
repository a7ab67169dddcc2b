"""Gate sessions: server-side, revocable, and cheap to check on every request.

A session is a row in the store (:class:`~gateway.store.SessionRow`: customer id, email,
created, last seen, device, revoked). The ``gate_session`` cookie carries only a random session
id (256 bits), signed with ``SESSION_SECRET`` (:class:`SessionCodec`, itsdangerous) so a forged
or tampered cookie is refused without a store read. The store keeps the SHA-256 of the id (its
*handle*), never the id itself: a copy of the database does not sign anyone in.

:class:`Sessions` creates sessions (every sign-in gets a new id: no fixation), resolves cookies
to an :class:`~gateway.model.Identity`, lists and revokes them. Resolving goes through an
in-process cache — a bounded LRU keyed by the raw cookie value, each entry living at most
``L1_TTL`` on the one injected clock — so the hot path does no store I/O and no HMAC for a
cookie it has seen. The bound that follows, documented in README (Identity) and THREAT_MODEL:

- a revocation on *this* worker drops its entries at once (and, through their ``live`` flag,
  every verdict derived from them: :class:`gateway.l1.Verdicts`);
- another worker, or the ``gateway revoke`` CLI, reaches every worker within ``L1_TTL``: the
  other workers' entries end by then and the next request reads the revoked row.

``last_seen`` is written when an entry is (re)filled from the store and the stored value is
at least ``L1_TTL`` old: at most once per ``L1_TTL`` per session per worker, never per request.
Every revocation is announced on :class:`~gateway.changes.Changes` as
``session(handle, customer_id)`` (open WebSockets of that user are re-checked).

Replicas (PostgreSQL, :mod:`gateway.replicas`): a revocation on another replica arrives as a
remote ``session`` change and :meth:`Sessions.on_remote` drops its entries here (so within the
bus's bound, 1 s, instead of ``L1_TTL``); a remote ``everyone`` empties the cache.

Store down: an entry that ends while the store cannot be read is kept for another ``L1_TTL``
(never past ``STALE_IF_ERROR`` after it was read, nor the session's expiry): a signed-in user
is not signed out by a database outage, during which no revocation can be written anyway.

Cookies of the earlier stateless format (a signed customer id and email) are refused: their
holders sign in again.
"""

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import hdrs, web
from itsdangerous import BadData, TimestampSigner, URLSafeTimedSerializer

from gateway.changes import Change, Changes
from gateway.livecache import LiveCache
from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock, Identity
from gateway.settings import SESSION_COOKIE, Settings
from gateway.store import SessionRow, Store, StoreError, email_key

__all__ = [
    "MAX_COOKIE_LENGTH",
    "SESSION_CACHE_SIZE",
    "SESSION_SALT",
    "SessionCodec",
    "SessionEntry",
    "Sessions",
    "clear_session",
    "device_summary",
    "session_cookie",
    "session_handle",
    "set_session",
]

log = logging.getLogger("gateway.identity")

SESSION_SALT = "gate-session"
#: Session cache entries (distinct cookies) per process; the least recently used goes first.
SESSION_CACHE_SIZE = 4096
#: Cookies longer than this are not ours (ours are ~120 bytes); not worth verifying.
MAX_COOKIE_LENGTH = 4096
#: Random bytes of a session id (256 bits; the brief asks for at least 128).
SESSION_ID_BYTES = 32
#: A read racing with revocations is retried this often, then refused (fail closed).
_RESOLVE_ATTEMPTS = 3


def _clock_signer(clock: Clock) -> type[TimestampSigner]:
    class ClockSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(clock.time())

    return ClockSigner


def session_handle(session_id: str) -> str:
    """The store's name for a session: the SHA-256 (hex) of its random id."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionCodec:
    """Signs and verifies the cookie value: a session id, signed and timestamped
    (itsdangerous, salt ``gate-session``), valid for ``SESSION_LIFETIME`` after signing.

    Without a ``SESSION_SECRET`` (billing off, demo) a random per-process key is used: cookies
    then do not survive a restart and are not shared between workers."""

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        secret = settings.session_secret
        if not secret:
            secret = secrets.token_urlsafe(32)
            log_event(
                log,
                "session_secret_random",
                level=logging.WARNING,
                reason="SESSION_SECRET unset",
                effect="sessions end when the process restarts and are not shared by workers",
            )
        self._lifetime = int(settings.session_lifetime)
        self._secure = settings.secure_cookies
        self._serializer = URLSafeTimedSerializer(
            secret, salt=SESSION_SALT, signer=_clock_signer(clock)
        )

    def dumps(self, session_id: str) -> str:
        """The signed cookie value naming ``session_id``."""
        return self._serializer.dumps({"s": session_id})

    def loads(self, value: str) -> str | None:
        """The session id in a cookie value; None if tampered, expired, foreign, garbage — or
        of the old stateless format (customer id and email in the cookie)."""
        if not value or len(value) > MAX_COOKIE_LENGTH:
            return None
        try:
            payload = self._serializer.loads(value, max_age=self._lifetime)
        except BadData:
            # Tampered, expired, signed with another key, or not ours at all: an anonymous
            # visitor, not an error.
            return None
        session_id = payload.get("s") if isinstance(payload, dict) else None
        if not isinstance(session_id, str) or not session_id:
            reason = "stateless_format" if isinstance(payload, dict) else "unexpected_payload"
            log_event(log, "session_cookie_rejected", level=logging.INFO, reason=reason)
            return None
        return session_id

    def cookie_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``response.set_cookie(SESSION_COOKIE, value, **kw)``."""
        return {
            "httponly": True,
            "samesite": "Lax",
            "secure": self._secure,
            "max_age": self._lifetime,
            "path": "/",
        }


@dataclass(slots=True, eq=False)
class SessionEntry:
    """One session cache entry: who the cookie names (None: nobody — revoked, expired,
    unknown), until when this worker may believe it, and whether it is still *the* entry
    (``live`` turns False the moment it leaves the cache; verdicts derived from it test it)."""

    identity: Identity | None
    handle: str
    until: float  # Unix seconds (Clock.time()): at most L1_TTL after it was read
    live: bool = True
    #: Until when it may be kept while the store cannot be read (Unix seconds).
    grace: float = 0.0


class Sessions:
    """Server-side sessions on the store, with the in-process cache (see the module
    docstring). ``clock`` and ``changes`` are the services' one clock and announcer."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: Clock = SYSTEM_CLOCK,
        changes: Changes | None = None,
        *,
        max_entries: int = SESSION_CACHE_SIZE,
    ) -> None:
        self.codec = SessionCodec(settings, clock=clock)
        self._store = store
        self._clock = clock
        self._time = clock.time
        self._changes = changes if changes is not None else Changes()
        self._ttl = float(settings.l1_ttl)
        self._stale = float(settings.stale_if_error)
        self._lifetime = timedelta(seconds=settings.session_lifetime)
        # Its generation is bumped by every local revocation: a store read that overlapped
        # one is not cached.
        self._cache: LiveCache[SessionEntry] = LiveCache(max_entries)
        #: Store reads and last_seen writes done by this cache (for tests and metrics).
        self.reads = 0
        self.touches = 0
        self._changes.listen(self.on_remote)

    def __len__(self) -> int:
        return len(self._cache)

    # --- the request path ---------------------------------------------------------------------

    def entry(self, value: str) -> SessionEntry | None:
        """The live cache entry of a signed-in cookie ``value`` (no I/O), or None."""
        entry = self._cache.get(value)
        if entry is None or entry.identity is None or self._time() >= entry.until:
            return None
        return entry

    async def resolve(self, value: str) -> Identity | None:
        """Who the cookie ``value`` signs in, or None (see :meth:`session`)."""
        entry = await self.session(value)
        return entry.identity if entry is not None else None

    async def session(self, value: str) -> SessionEntry | None:
        """The cache entry of the session the cookie ``value`` signs in (its ``identity`` is
        who), or None. From the cache while its entry lives (at most ``L1_TTL``), else from the
        store. A store failure refuses (fail closed)."""
        entry = self._cache.get(value)
        if entry is not None:
            if self._time() < entry.until:
                self._cache.used(value)
                return entry if entry.identity is not None else None
            self._cache.drop(value)
        ended = entry
        session_id = self.codec.loads(value)
        if session_id is None:
            return None
        handle = session_handle(session_id)
        for _ in range(_RESOLVE_ATTEMPTS):
            generation = self._cache.generation
            try:
                row = await self._store.get_session(handle)
            except StoreError as exc:
                log_event(log, "session_read_failed", level=logging.WARNING, error=str(exc))
                return self._kept(value, ended if generation == self._cache.generation else None)
            self.reads += 1
            current = self._cache.get(value)
            if current is not None and self._time() < current.until:
                # a concurrent request filled it meanwhile
                return current if current.identity is not None else None
            if generation != self._cache.generation:
                continue  # a revocation overlapped the read: read again
            return await self._fill(value, handle, row)
        return None

    async def _fill(self, value: str, handle: str, row: SessionRow | None) -> SessionEntry | None:
        now = self._clock.now()
        t = now.timestamp()
        if row is None or not row.active(now):
            self._cache.put(value, SessionEntry(None, handle, t + self._ttl))
            return None
        entry = self._keep(value, row, t)
        if t - row.last_seen.timestamp() >= self._ttl:
            try:
                await self._store.touch_session(handle, now)
                self.touches += 1
            except StoreError as exc:  # only last_seen is lost; the session stands
                log_event(log, "session_touch_failed", level=logging.WARNING, error=str(exc))
        return entry

    def _keep(self, value: str, row: SessionRow, t: float) -> SessionEntry:
        """Cache the working session ``row`` (read from the store, or made, at ``t``) for the
        cookie ``value``: for ``L1_TTL``, with its grace, never past its expiry."""
        ends = row.expires_at.timestamp()
        identity = Identity(row.email, row.customer_id, "cookie")
        entry = SessionEntry(
            identity, row.id_hash, min(t + self._ttl, ends), grace=min(t + self._stale, ends)
        )
        self._cache.put(value, entry)
        return entry

    def _kept(self, value: str, ended: SessionEntry | None) -> SessionEntry | None:
        """The store cannot be read: the entry that just ended, for another ``L1_TTL`` within
        its grace (see the module docstring), else None (refused)."""
        if ended is None or ended.identity is None:
            return None
        now = self._time()
        if now >= ended.grace:
            return None
        until = min(now + self._ttl, ended.grace)
        entry = SessionEntry(ended.identity, ended.handle, until, grace=ended.grace)
        self._cache.put(value, entry)
        log_event(log, "session_kept", level=logging.INFO, session=ended.handle[:12])
        return entry

    def on_remote(self, change: Change) -> None:
        """A :class:`Changes` listener: a session revoked on another replica is refused here
        at once; a remote ``everyone`` (missed notifications) empties the cache."""
        if not change.remote:
            return
        if change.kind == "session" and change.key:
            self._forget({change.key}, None)
        elif change.kind == "everyone":
            self._cache.forget(lambda entry: True)

    def handle_of(self, value: str) -> str | None:
        """The handle of the session a (validly signed) cookie ``value`` names."""
        entry = self._cache.get(value)
        if entry is not None:
            return entry.handle
        session_id = self.codec.loads(value)
        return session_handle(session_id) if session_id is not None else None

    # --- sign-in, listing, sign-out -----------------------------------------------------------

    async def create(self, customer_id: str, email: str | None, user_agent: str = "") -> str:
        """A new session for ``customer_id`` (a fresh random id, never an existing one);
        returns the cookie value. Raises :class:`StoreError`."""
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        handle = session_handle(session_id)
        now = self._clock.now()
        mail = email_key(email) if email else None
        row = SessionRow(
            id_hash=handle,
            customer_id=customer_id,
            email=mail,
            created_at=now,
            last_seen=now,
            expires_at=now + self._lifetime,
            device=device_summary(user_agent),
            revoked_at=None,
        )
        await self._store.create_session(row)
        value = self.codec.dumps(session_id)
        self._keep(value, row, now.timestamp())
        log_event(log, "session_created", customer=customer_id, session=handle[:12])
        return value

    async def active(self, customer_id: str) -> list[SessionRow]:
        """The customer's active sessions, most recently seen first. Raises StoreError."""
        return await self._store.active_sessions(customer_id, self._clock.now())

    async def revoke(self, value: str) -> bool:
        """Revoke the session the cookie ``value`` names (sign-out); whether one was active.
        This worker refuses the cookie at once. Raises :class:`StoreError`."""
        session_id = self.codec.loads(value)
        if session_id is None:
            return False
        handle = session_handle(session_id)
        row = await self._store.revoke_session(handle, self._clock.now())
        self._forget({handle}, None)
        if row is None:
            return False
        log_event(log, "session_revoked", customer=row.customer_id, session=handle[:12])
        self._changes.session(handle, row.customer_id)
        return True

    async def revoke_all(self, customer_id: str) -> int:
        """Revoke every session of ``customer_id`` (sign out everywhere, ``gateway revoke``);
        how many were active. Raises :class:`StoreError`."""
        handles = await self._store.revoke_sessions_of(customer_id, self._clock.now())
        self._forget(set(handles), customer_id)
        log_event(log, "sessions_revoked", customer=customer_id, count=len(handles))
        for handle in handles:
            self._changes.session(handle, customer_id)
        return len(handles)

    def revoked(self, handles: list[str], user: str = "") -> None:
        """Sessions revoked in the store by someone else's action (a team's owner removed
        their member): refused on this worker at once, and announced (other workers and
        replicas, the open sockets of ``user``)."""
        self._forget(set(handles), None)
        for handle in handles:
            self._changes.session(handle, user)

    # --- the cache ----------------------------------------------------------------------------

    def _forget(self, handles: set[str], customer_id: str | None) -> None:
        """Drop the entries of these sessions (and, with ``customer_id``, every entry of that
        customer)."""
        self._cache.forget(
            lambda entry: (
                entry.handle in handles
                or (
                    customer_id is not None
                    and entry.identity is not None
                    and entry.identity.customer_id == customer_id
                )
            )
        )


# --- the cookie on the wire ---------------------------------------------------------------------


async def set_session(
    response: web.StreamResponse,
    sessions: Sessions,
    request: web.Request,
    customer_id: str,
    email: str | None,
) -> None:
    """Sign the user in: create a NEW server-side session (whatever cookie the browser sent is
    not reused: no fixation) and set its cookie on ``response``. The session the browser had
    until now, if any, is revoked: it is replaced, not left behind. Raises StoreError."""
    previous = session_cookie(request.headers.get(hdrs.COOKIE))
    value = await sessions.create(customer_id, email, request.headers.get("User-Agent", ""))
    if previous:
        await sessions.revoke(previous)
    response.set_cookie(SESSION_COOKIE, value, **sessions.codec.cookie_kwargs())


def clear_session(response: web.StreamResponse, settings: Settings) -> None:
    """Expire the gate session cookie (same path and flags as when set). The session itself
    is revoked by :meth:`Sessions.revoke`."""
    response.del_cookie(
        SESSION_COOKIE,
        path="/",
        secure=settings.secure_cookies,
        httponly=True,
        samesite="Lax",
    )


#: HTTP's optional whitespace (RFC 9110 §5.6.3).
_OWS = " \t"


def session_cookie(header: str | None) -> str | None:
    """The gate's cookie from a raw ``Cookie`` header, or None.

    On the hot path this replaces ``request.cookies`` (aiohttp parses every cookie of the
    header into a dict, which was the largest single cost of a cached paying request).
    Only spaces and tabs are trimmed (HTTP's whitespace; what the shipped nginx and Caddy
    configs strip around the name), never Unicode spaces: a cookie the gate signs in with
    must be one those configs keep from the app."""
    if not header or SESSION_COOKIE not in header:
        return None
    for part in header.split(";"):
        name, _, value = part.partition("=")
        if name.strip(_OWS) == SESSION_COOKIE:
            value = value.strip(_OWS)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


# --- "Chrome on Linux" ----------------------------------------------------------------------------

# Order matters: Edge and Opera say "Chrome", Chrome says "Safari", Android says "Linux".
_BROWSERS = (
    ("Edge", re.compile(r"\bEdg(e|A|iOS)?/")),
    ("Opera", re.compile(r"\bOPR/|\bOpera\b")),
    ("Firefox", re.compile(r"\bFirefox/|\bFxiOS/")),
    ("Chrome", re.compile(r"\b(?:Headless)?Chrom(e|ium)/|\bCriOS/")),
    ("Safari", re.compile(r"\bSafari/")),
    ("curl", re.compile(r"^curl/")),
)
_SYSTEMS = (
    ("Android", re.compile(r"\bAndroid\b")),
    ("iOS", re.compile(r"\biPhone\b|\biPad\b|\biOS\b")),
    ("ChromeOS", re.compile(r"\bCrOS\b")),
    ("Windows", re.compile(r"\bWindows\b")),
    ("macOS", re.compile(r"\bMac OS X\b|\bMacintosh\b")),
    ("Linux", re.compile(r"\bLinux\b|\bX11\b")),
)


def device_summary(user_agent: str) -> str:
    """A short, human name for a ``User-Agent``: ``Chrome on Linux``, ``Safari on iOS``,
    ``Firefox``, ``Unknown device``. Kept instead of the header (no fingerprint stored)."""
    ua = user_agent[:512]
    browser = next((name for name, rx in _BROWSERS if rx.search(ua)), None)
    system = next((name for name, rx in _SYSTEMS if rx.search(ua)), None)
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or "Unknown device"
