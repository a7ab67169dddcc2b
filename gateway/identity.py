"""Identity: *who* is asking (never *what they paid for*; that is ``entitlement``).

Two sources, checked in this order by :func:`identify`:

1. a trusted identity header (``IDENTITY_HEADER``, e.g. ``X-Forwarded-Email`` from oauth2-proxy),
   believed only when the direct peer is a trusted proxy;
2. the gate's own session cookie (``SESSION_COOKIE``, :mod:`gateway.sessions`), set after
   Checkout and after an email sign-in link (:mod:`gateway.signin`).

The session names (:class:`SessionCodec`, :func:`set_session`, :func:`clear_session`,
:func:`session_cookie`) stay importable from here for existing callers; they live in
:mod:`gateway.sessions`.
"""

import logging

from aiohttp import hdrs, web

from gateway.emails import valid_email
from gateway.identity_header import trusted_identity_header
from gateway.logs import log_event
from gateway.model import Identity
from gateway.sessions import SessionCodec, clear_session, session_cookie, set_session
from gateway.settings import Settings

__all__ = [
    "SessionCodec",
    "clear_session",
    "identify",
    "normalize_email",
    "session_cookie",
    "set_session",
]

log = logging.getLogger(__name__)


def normalize_email(value: str) -> str | None:
    """``value`` stripped and lower-cased if it looks like an email address, else None (the
    one rule of :func:`gateway.emails.valid_email`)."""
    return valid_email(value)


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
