"""Identity: *who* is asking (never *what they paid for*; that is ``entitlement``).

Two sources, checked in this order by :func:`identify`:

1. a trusted identity header (``IDENTITY_HEADER``, e.g. ``X-Forwarded-Email`` from oauth2-proxy),
   believed only when the direct peer is a trusted proxy;
2. the gate's own session cookie (``SESSION_COOKIE``, :mod:`gateway.sessions`), set after
   Checkout and after an email sign-in link (:mod:`gateway.signin`). It names a server-side
   session (revocable); :class:`~gateway.sessions.Sessions` resolves it, from an in-process
   cache whose entries live at most ``L1_TTL``.

The session names (:class:`SessionCodec`, :class:`Sessions`, :func:`set_session`,
:func:`clear_session`, :func:`session_cookie`) stay importable from here for existing callers;
they live in :mod:`gateway.sessions`.
"""

import logging
from collections.abc import Mapping
from typing import NamedTuple

from aiohttp import hdrs

from gateway.emails import valid_email
from gateway.identity_header import trusted_identity_header
from gateway.logs import log_event
from gateway.model import Identity
from gateway.sessions import (
    SessionCodec,
    SessionEntry,
    Sessions,
    clear_session,
    session_cookie,
    set_session,
)
from gateway.settings import Settings

__all__ = [
    "SessionCodec",
    "Sessions",
    "Who",
    "clear_session",
    "identify",
    "identify_from",
    "session_cookie",
    "set_session",
]

log = logging.getLogger(__name__)


class Who(NamedTuple):
    """Who is asking, and the session cache entry that said so (cookie identities only: the
    gate's remembered verdict rests on it)."""

    identity: Identity | None
    session: SessionEntry | None = None


_NOBODY = Who(None)


async def identify(
    headers: Mapping[str, str], sessions: Sessions, settings: Settings, peer_trusted: bool
) -> Who:
    """Who is asking: the trusted identity header, else the session cookie, else nobody (see
    :func:`identify_from`)."""
    named = trusted_identity_header(headers, settings, peer_trusted)
    return await identify_from(named, headers.get(hdrs.COOKIE), sessions, settings)


async def identify_from(
    named: str | None, cookie_header: str | None, sessions: Sessions, settings: Settings
) -> Who:
    """Who is asking, given the believed identity-header value (``named``, from
    :func:`~gateway.identity_header.trusted_identity_header`: the peer is trusted) and the raw
    ``Cookie`` header.

    A header value that looks like an email address wins over the cookie. Called on every
    proxied request that is not answered by a remembered verdict: a cookie seen within
    ``L1_TTL`` is answered from the session cache (no I/O); otherwise one store read (revoked
    or unknown: nobody).
    """
    if named is not None:
        email = valid_email(named)
        if email is not None:
            return Who(Identity(email=email, customer_id=None, source="header"))
        # Not fatal (the cookie may still identify the user), but worth seeing when an
        # auth proxy sends user names instead of emails. The value itself is not logged.
        log_event(
            log,
            "identity_header_ignored",
            level=logging.DEBUG,
            header=settings.identity_header,
            reason="not_an_email",
        )
    value = session_cookie(cookie_header)
    if value:
        entry = await sessions.session(value)
        if entry is not None:
            return Who(entry.identity, entry)
    return _NOBODY
