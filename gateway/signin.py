"""Email sign-in links for returning users on a new device.

:class:`LoginLinks` sends single-use, expiring links (``LOGIN_TOKEN_TTL``) whose token is stored
only as a SHA-256 hash, rate-limited per email and per client IP (``LOGIN_RATE_LIMIT`` per
:data:`LOGIN_RATE_WINDOW`). Tokens and rate-limit buckets are its own state in the store; what
an email pays for is not its business (the sign-in page asks ``Entitlements`` after
:meth:`LoginLinks.verify`).
"""

import hashlib
import logging
import re
import secrets
from datetime import timedelta

from gateway.identity import normalize_email
from gateway.logs import log_event
from gateway.mailer import Mailer
from gateway.model import SYSTEM_CLOCK, Clock
from gateway.settings import Settings
from gateway.store import Store

__all__ = ["LOGIN_RATE_WINDOW", "MAX_TOKEN_LENGTH", "LoginLinks"]

log = logging.getLogger("gateway.identity")

#: Window of the sign-in rate limit (``LOGIN_RATE_LIMIT`` per window, per email and per IP).
LOGIN_RATE_WINDOW = timedelta(minutes=15)
#: ``secrets.token_urlsafe(32)`` is 43 characters; anything much longer is not a token.
MAX_TOKEN_LENGTH = 128

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


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
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = store
        self._mailer = mailer
        self._clock = clock.now
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
