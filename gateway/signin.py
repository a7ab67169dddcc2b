"""Email sign-in links for returning users on a new device.

:class:`LoginLinks` sends single-use, expiring links (``LOGIN_TOKEN_TTL``) whose token is stored
only as a SHA-256 hash. Limits, all over a sliding :data:`LOGIN_RATE_WINDOW` of one
minute:

- ``LOGIN_RATE_LIMIT`` per (email, client IP) pair and per client IP. An address is not
  limited on its own: then anyone asking for links to a victim's address, from anywhere, would
  lock the victim out for as long as they kept asking (with a 15-minute window, six requests
  did it for 15 minutes). Requests from other IPs never count against the victim's; someone
  on the victim's own IP (a shared NAT) delays them at most a minute after they stop;
- ``LOGIN_EMAILS_PER_MINUTE`` in total, whoever asks: rotating addresses, or ``X-Forwarded-For``
  through a trusted proxy, cannot make the gate send more than that (mail reputation, SMTP
  quotas). While the cap is reached, sign-in links wait for everyone (logged at WARNING).

A new link replaces the older unused ones for that email (only the latest works). Tokens and
rate-limit buckets are its own state in the store; what an email pays for is not its business
(the sign-in page asks ``Entitlements`` after :meth:`LoginLinks.redeem`).
"""

import hashlib
import logging
import re
import secrets
from datetime import timedelta
from typing import Literal, NamedTuple

from gateway.identity import normalize_email
from gateway.logs import log_event
from gateway.mailer import Mailer
from gateway.model import SYSTEM_CLOCK, Clock
from gateway.settings import Settings
from gateway.store import Store

__all__ = ["LOGIN_RATE_WINDOW", "MAX_TOKEN_LENGTH", "LoginLinks", "Redeemed"]

log = logging.getLogger("gateway.identity")

#: Window of the sign-in rate limits (per email and IP, per IP, and the global cap).
LOGIN_RATE_WINDOW = timedelta(minutes=1)
#: ``secrets.token_urlsafe(32)`` is 43 characters; anything much longer is not a token.
MAX_TOKEN_LENGTH = 128
#: Bucket of the global cap (every email sent counts).
GLOBAL_BUCKET = "login:all"

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Redeemed(NamedTuple):
    """What a sign-in token turned out to be: ``ok`` (with the email), or why not."""

    outcome: Literal["ok", "used", "replaced", "expired", "invalid"]
    email: str | None = None


class LoginLinks:
    """Email sign-in links for returning users on a new device.

    A link is sent to any well-formed address that asks (rate limits permitting), customer or
    not, so the page that asks can never reveal who is a customer; what the address maps to is
    decided after :meth:`redeem`. Only the SHA-256 of a token is stored, so a copy of the
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
        self._global = settings.login_emails_per_minute

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
        since = now - LOGIN_RATE_WINDOW
        # Buckets are keyed by hashes: the rate-limit table holds no addresses.
        email_bucket = f"login:pair:{_digest(f'{normalized} {client_ip}')[:32]}"
        ip_bucket = f"login:ip:{client_ip}"
        # Count after recording this attempt, so two concurrent requests cannot both slip
        # under the limit between a check and a write.
        await self._store.hit(email_bucket, now)
        await self._store.hit(ip_bucket, now)
        by_email = await self._store.count_recent(email_bucket, since)
        by_ip = await self._store.count_recent(ip_bucket, since)
        if by_email > self._limit or by_ip > self._limit:
            self._limited("rate_limited", client_ip, by_email=by_email, by_ip=by_ip)
            return
        # The global cap counts only what passed the limits above, i.e. what would be sent.
        await self._store.hit(GLOBAL_BUCKET, now)
        total = await self._store.count_recent(GLOBAL_BUCKET, since)
        if total > self._global:
            self._limited("global_cap", client_ip, total=total, cap=self._global)
            return
        token = secrets.token_urlsafe(32)
        # Replaces the email's older unused links: only the newest one works.
        await self._store.put_login_token(_digest(token), normalized, now + self._ttl, now)
        # ``link_base`` may already carry a query (e.g. ``?next=/path``).
        separator = "&" if "?" in link_base else "?"
        await self._mailer.send_login_link(normalized, f"{link_base}{separator}token={token}")
        log_event(log, "login_link", outcome="sent", ip=client_ip)

    def _limited(self, outcome: str, client_ip: str, **counts: int) -> None:
        log_event(
            log,
            "login_link",
            level=logging.WARNING,
            outcome=outcome,
            limit=self._limit,
            ip=client_ip,
            **counts,
        )

    async def redeem(self, token: str) -> Redeemed:
        """Consume a sign-in token: ``ok`` and its email, else why it does not work (``used``
        once already, ``replaced`` by a newer link, ``expired``, or ``invalid``: unknown or
        malformed). A token works once."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            return Redeemed("invalid")
        now = self._clock()
        digest = _digest(token)
        email = await self._store.consume_login_token(digest, now)
        if email is not None:
            log_event(log, "login_verify", outcome="ok")
            return Redeemed("ok", email)
        fate = await self._store.login_token_fate(digest)
        outcome: Literal["used", "replaced", "expired", "invalid"] = fate or "invalid"
        log_event(log, "login_verify", outcome=outcome)
        return Redeemed(outcome)

    async def peek(self, token: str) -> str | None:
        """The email a working token signs in, without using it (None: it does not work)."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            return None
        return await self._store.login_token_email(_digest(token), self._clock())

    async def verify(self, token: str) -> str | None:
        """The email of a sign-in token (see :meth:`redeem`), or None if it does not work."""
        return (await self.redeem(token)).email
