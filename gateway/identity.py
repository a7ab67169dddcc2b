"""Identity: *who* is asking (never *what they paid for*; that is ``entitlement``).

Two sources, checked in this order by :func:`identify`:

1. a trusted identity header (``IDENTITY_HEADER``, e.g. ``X-Forwarded-Email`` from oauth2-proxy),
   believed only when the direct peer is a trusted proxy;
2. the gate's own session cookie (``SESSION_COOKIE``), signed with itsdangerous
   (:class:`SessionCodec`), set after Checkout and after an email sign-in link.

:class:`LoginLinks` runs the email sign-in for returning users on a new device: single-use,
expiring links whose token is stored only as a SHA-256 hash.
"""

import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from aiohttp import hdrs, web
from itsdangerous import BadData, TimestampSigner, URLSafeTimedSerializer

from gateway.identity_header import trusted_identity_header
from gateway.logs import log_event
from gateway.mailer import Mailer
from gateway.model import Identity, utcnow
from gateway.settings import SESSION_COOKIE, Settings
from gateway.store import Store

log = logging.getLogger(__name__)

SESSION_SALT = "gate-session"
#: Verified cookie values remembered by one :class:`SessionCodec` (per process).
SESSION_CACHE_SIZE = 4096
#: Cookies longer than this are not ours (ours are ~150 bytes); not worth verifying.
MAX_COOKIE_LENGTH = 4096
#: Window of the sign-in rate limit (``LOGIN_RATE_LIMIT`` per window, per email and per IP).
LOGIN_RATE_WINDOW = timedelta(minutes=15)
#: ``secrets.token_urlsafe(32)`` is 43 characters; anything much longer is not a token.
MAX_TOKEN_LENGTH = 128

# Deliberately simple: one @, no whitespace, control characters, commas, quotes or angle
# brackets, an ASCII domain with a dot. A sanity check of what a proxy or a form hands us,
# not RFC 5322.
_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f,;<>\"'()\[\]\\]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def normalize_email(value: str) -> str | None:
    """``value`` stripped and lower-cased if it looks like an email address, else None."""
    email = value.strip().lower()
    if len(email) > 254 or not _EMAIL.fullmatch(email):
        return None
    return email


def _clock_signer(clock: Callable[[], float]) -> type[TimestampSigner]:
    class ClockSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(clock())

    return ClockSigner


class SessionCodec:
    """Signs and verifies the gate session cookie (itsdangerous, salt ``gate-session``).

    The cookie carries the Stripe customer id and the email, signed with ``SESSION_SECRET`` and
    timestamped; it is valid for ``SESSION_LIFETIME`` after it was issued. Without a
    ``SESSION_SECRET`` (billing off, demo) a random per-process key is used: cookies then do not
    survive a restart and are not shared between workers.

    Verified values are remembered in a bounded LRU keyed by the raw cookie string, with the
    cookie's own expiry, so the hot path skips the HMAC for a cookie it has already checked.
    ``clock`` (Unix seconds) is injectable for tests.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
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
        self._clock = clock
        self._lifetime = int(settings.session_lifetime)
        self._secure = settings.secure_cookies
        self._serializer = URLSafeTimedSerializer(
            secret, salt=SESSION_SALT, signer=_clock_signer(clock)
        )
        self._cache: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    def dumps(self, customer_id: str, email: str | None) -> str:
        """A signed cookie value for this customer (and email, if known)."""
        return self._serializer.dumps({"c": customer_id, "e": email})

    def loads(self, value: str) -> Identity | None:
        """The identity in a cookie value; None if tampered, expired, foreign or garbage."""
        cached = self._cache.get(value)
        if cached is not None:
            known, expires = cached
            if self._clock() < expires:
                self._cache.move_to_end(value)
                return known
            del self._cache[value]
            return None
        if not value or len(value) > MAX_COOKIE_LENGTH:
            return None
        try:
            payload, signed_at = self._serializer.loads(
                value, max_age=self._lifetime, return_timestamp=True
            )
        except BadData:
            # Tampered, expired, signed with another key, or not ours at all: an anonymous
            # visitor, not an error.
            return None
        identity = self._identity(payload)
        if identity is None:
            log_event(
                log, "session_cookie_rejected", level=logging.WARNING, reason="unexpected_payload"
            )
            return None
        self._cache[value] = (identity, signed_at.timestamp() + self._lifetime)
        if len(self._cache) > SESSION_CACHE_SIZE:
            self._cache.popitem(last=False)
        return identity

    def valid_until(self, value: str) -> float | None:
        """When the cookie ``value``, verified by :meth:`loads` and still remembered, stops
        being valid (Unix seconds, ``time.time()``); None if it is not remembered, or when this
        codec runs on an injected clock."""
        if self._clock is not time.time:
            return None
        cached = self._cache.get(value)
        return cached[1] if cached is not None else None

    @staticmethod
    def _identity(payload: object) -> Identity | None:
        if not isinstance(payload, dict):
            return None
        customer_id, email = payload.get("c"), payload.get("e")
        if not isinstance(customer_id, str) or not customer_id:
            return None
        if email is not None and not isinstance(email, str):
            return None
        return Identity(email=email, customer_id=customer_id, source="cookie")

    def cookie_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``response.set_cookie(SESSION_COOKIE, value, **kw)``."""
        return {
            "httponly": True,
            "samesite": "Lax",
            "secure": self._secure,
            "max_age": self._lifetime,
            "path": "/",
        }


def set_session(
    response: web.StreamResponse, codec: SessionCodec, customer_id: str, email: str | None
) -> None:
    """Sign the user in: set the gate session cookie on ``response``."""
    response.set_cookie(SESSION_COOKIE, codec.dumps(customer_id, email), **codec.cookie_kwargs())


def clear_session(response: web.StreamResponse, settings: Settings) -> None:
    """Sign the user out: expire the gate session cookie (same path and flags as when set)."""
    response.del_cookie(
        SESSION_COOKIE,
        path="/",
        secure=settings.secure_cookies,
        httponly=True,
        samesite="Lax",
    )


def identify(
    request: web.Request, codec: SessionCodec, settings: Settings, peer_trusted: bool
) -> Identity | None:
    """Who is asking: the trusted identity header, else the session cookie, else None.

    The header is believed only when ``peer_trusted`` (the direct peer is in
    ``TRUSTED_PROXIES``) and its value looks like an email address; then it wins over the
    cookie. Called on every proxied request: no I/O, and verified cookies come from a cache.
    """
    raw = trusted_identity_header(request.headers, settings, peer_trusted)
    if raw is not None:
        email = normalize_email(raw)
        if email is not None:
            return Identity(email=email, customer_id=None, source="header")
        # Not fatal (the cookie may still identify the user), but worth seeing when an
        # auth proxy sends user names instead of emails. The value itself is not logged.
        log_event(
            log,
            "identity_header_ignored",
            level=logging.DEBUG,
            header=settings.identity_header,
            reason="not_an_email",
        )
    value = session_cookie(request.headers.get(hdrs.COOKIE))
    if value:
        return codec.loads(value)
    return None


def session_cookie(header: str | None) -> str | None:
    """The gate's cookie from a raw ``Cookie`` header, or None.

    On the hot path this replaces ``request.cookies`` (aiohttp parses every cookie of the
    header into a dict, which was the largest single cost of a cached paying request)."""
    if not header or SESSION_COOKIE not in header:
        return None
    for part in header.split(";"):
        name, _, value = part.partition("=")
        if name.strip() == SESSION_COOKIE:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class LoginLinks:
    """Email sign-in links for returning users on a new device.

    A link is sent to any well-formed address that asks (rate limits permitting), customer or
    not, so the page that asks can never reveal who is a customer; what the address maps to is
    decided after :meth:`verify`. Only the SHA-256 of a token is stored, so a copy of the
    database does not hold usable links.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        mailer: Mailer,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._mailer = mailer
        self._clock = clock
        self._ttl = timedelta(seconds=settings.login_token_ttl)
        self._limit = settings.login_rate_limit

    async def request(self, email: str, client_ip: str, link_base: str) -> None:
        """Send a sign-in link to ``email`` unless a rate limit is reached.

        Over a limit, or for a malformed address, nothing is sent (the reason is logged) and
        nothing is raised: the caller shows the same "check your inbox" page in every case.
        Raises :class:`gateway.mailer.MailError` if the mail server fails.
        """
        normalized = normalize_email(email)
        if normalized is None:
            log_event(log, "login_link", outcome="skipped", reason="malformed_email")
            return
        now = self._clock()
        # Buckets are keyed by hashes: the rate-limit table holds no addresses.
        email_bucket = f"login:email:{_digest(normalized)[:32]}"
        ip_bucket = f"login:ip:{client_ip}"
        # Count after recording this attempt, so two concurrent requests cannot both slip
        # under the limit between a check and a write.
        await self._store.hit(email_bucket, now)
        await self._store.hit(ip_bucket, now)
        since = now - LOGIN_RATE_WINDOW
        by_email = await self._store.count_recent(email_bucket, since)
        by_ip = await self._store.count_recent(ip_bucket, since)
        if by_email > self._limit or by_ip > self._limit:
            log_event(
                log,
                "login_link",
                level=logging.WARNING,
                outcome="rate_limited",
                by_email=by_email,
                by_ip=by_ip,
                limit=self._limit,
                ip=client_ip,
            )
            return
        token = secrets.token_urlsafe(32)
        await self._store.put_login_token(_digest(token), normalized, now + self._ttl)
        # ``link_base`` may already carry a query (e.g. ``?next=/path``).
        separator = "&" if "?" in link_base else "?"
        await self._mailer.send_login_link(normalized, f"{link_base}{separator}token={token}")
        log_event(log, "login_link", outcome="sent", ip=client_ip)

    async def verify(self, token: str) -> str | None:
        """Consume a sign-in token: the email it was sent to, or None if unknown, used or
        expired. A token works once."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            return None
        email = await self._store.consume_login_token(_digest(token), self._clock())
        log_event(log, "login_verify", outcome="ok" if email else "invalid")
        return email
