"""Gate sessions: the signed session cookie and what it says (who, until when).

:class:`SessionCodec` signs and verifies the cookie value (itsdangerous); :func:`set_session` /
:func:`clear_session` put it on / take it off a response; :func:`session_cookie` finds it in a
raw ``Cookie`` header without parsing the others (the hot path).

The rest of the gate sees a session only through ``dumps(customer_id, email) -> value``,
``loads(value) -> Identity | None`` and ``valid_until(value) -> float | None``, so a server-side
session (the value naming a row in the store, revocable) can replace the signed payload behind
the same three methods.
"""

import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web
from itsdangerous import BadData, TimestampSigner, URLSafeTimedSerializer

from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock, Identity
from gateway.settings import SESSION_COOKIE, Settings

__all__ = [
    "MAX_COOKIE_LENGTH",
    "SESSION_CACHE_SIZE",
    "SESSION_SALT",
    "SessionCodec",
    "clear_session",
    "session_cookie",
    "set_session",
]

log = logging.getLogger("gateway.identity")

SESSION_SALT = "gate-session"
#: Verified cookie values remembered by one :class:`SessionCodec` (per process).
SESSION_CACHE_SIZE = 4096
#: Cookies longer than this are not ours (ours are ~150 bytes); not worth verifying.
MAX_COOKIE_LENGTH = 4096


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
    ``clock`` is the services' one clock (a manual one in tests).
    """

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
        self._clock = clock.time
        self._lifetime = int(settings.session_lifetime)
        self._secure = settings.secure_cookies
        self._serializer = URLSafeTimedSerializer(
            secret, salt=SESSION_SALT, signer=_clock_signer(clock.time)
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
        being valid (Unix seconds on this codec's clock); None if it is not remembered."""
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
