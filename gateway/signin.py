"""Email sign-in links for returning users on a new device.

:class:`LoginLinks` sends single-use, expiring links (``LOGIN_TOKEN_TTL``) whose token is stored
only as a SHA-256 hash. A request goes through, in order (each one sends nothing, and shows the
same page, when it refuses):

1. **per client** — ``LOGIN_RATE_LIMIT`` requests a minute per client IP (an IPv6 client: per
   /64, which one host may hold whole);
2. **per address** — no mail within ``LOGIN_LINK_COOLDOWN`` of the last one, and at most
   ``LOGIN_LINKS_PER_ADDRESS`` links held at once, counted per *mailbox*
   (:func:`gateway.emails.mailbox_key`: ``victim+1@…`` and ``victim+2@…`` are one inbox; the
   store keeps each token's key), while the mail goes to the address as typed and its link
   signs in that exact address. A new link never replaces an older one, so
   whoever asks for a victim's address from anywhere cannot take away the link the victim has:
   they only make more (working) links arrive in the victim's inbox, a bounded number per hour;
3. **the global budget** — ``LOGIN_EMAILS_PER_MINUTE`` mails in total, whoever asks (mail
   reputation, SMTP quotas). Its first half is anyone's; the second half only serves a client
   network (IPv4 /24, IPv6 /64) that has had no link in the last minute. So senders that fill
   the budget are refused while a new sender (the victim of the flood) still gets a link, as
   long as the flood comes from fewer networks than half the budget.

Tokens and rate-limit buckets are its own state in the store (shared by every worker and
replica; each check that decides a mail is one transaction there); what an email pays for is
not its business (the sign-in page asks ``Entitlements`` after :meth:`LoginLinks.redeem`).
"""

import hashlib
import ipaddress
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, NamedTuple

from gateway.emails import valid_email
from gateway.logs import log_event
from gateway.mailer import Mailer, MailError
from gateway.model import SYSTEM_CLOCK, Clock
from gateway.settings import Settings
from gateway.store import Store

__all__ = [
    "LOGIN_RATE_WINDOW",
    "MAX_TOKEN_LENGTH",
    "LoginLinks",
    "Redeemed",
    "client_key",
    "sender_network",
    "shared_mail_budget",
]

log = logging.getLogger("gateway.identity")

#: Window of the per-client limit and of the global budget.
LOGIN_RATE_WINDOW = timedelta(minutes=1)
#: ``secrets.token_urlsafe(32)`` is 43 characters; anything much longer is not a token.
MAX_TOKEN_LENGTH = 128
#: Bucket of the global budget (every email sent counts).
GLOBAL_BUCKET = "login:all"

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def shared_mail_budget(settings: Settings) -> int:
    """Of the global mail budget (``LOGIN_EMAILS_PER_MINUTE``), what any client network may
    take; the rest is kept for sign-in links to networks that had none this minute."""
    budget = settings.login_emails_per_minute
    return budget - budget // 2


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _network(ip: str, v4_prefix: int) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # a unix-socket peer (""), or a trusted proxy's odd hop: itself
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Network((addr, v4_prefix), strict=False))
    return str(ipaddress.IPv6Network((addr.packed, 64), strict=False))


def client_key(ip: str) -> str:
    """Who ``LOGIN_RATE_LIMIT`` counts: an IPv4 address, or an IPv6 client's /64 (a single
    host is routinely given a whole /64, so its addresses are one client)."""
    return _network(ip, 32).removesuffix("/32")


def sender_network(ip: str) -> str:
    """The network a client counts in for the global budget's fair share: an IPv4 /24 or an
    IPv6 /64."""
    return _network(ip, 24)


class Redeemed(NamedTuple):
    """What a sign-in token turned out to be: ``ok`` (with the email), or why not."""

    outcome: Literal["ok", "used", "expired", "invalid"]
    email: str | None = None


@dataclass(eq=False, repr=False, slots=True)
class LoginLinks:
    """Email sign-in links for returning users on a new device.

    A link is sent to any well-formed address that asks (limits permitting), customer or not,
    so the page that asks can never reveal who is a customer; what the address maps to is
    decided after :meth:`redeem`. Only the SHA-256 of a token is stored, so a copy of the
    database does not hold usable links. The limits are the ``LOGIN_*`` settings.
    """

    settings: Settings
    store: Store
    mailer: Mailer
    clock: Clock = SYSTEM_CLOCK

    async def request(self, email: str, client_ip: str, link_base: str) -> None:
        """Send a sign-in link to ``email`` unless a limit refuses it.

        When refused, or for a malformed address, nothing is sent (the reason is logged) and
        nothing is raised: the caller shows the same "check your inbox" page in every case.
        Raises :class:`gateway.mailer.MailError` if the mail server fails.
        """
        normalized = valid_email(email)
        if normalized is None:
            log_event(log, "login_link", outcome="skipped", reason="malformed_email")
            return
        now = self.clock.now()
        since = now - LOGIN_RATE_WINDOW
        # 1. The client. Counted after recording this attempt, so two concurrent requests
        # cannot both slip under the limit between a check and a write.
        ip_bucket = f"login:ip:{client_key(client_ip)}"
        await self.store.hit(ip_bucket, now)
        by_ip = await self.store.count_recent(ip_bucket, since)
        limit = self.settings.login_rate_limit
        if by_ip > limit:
            self._refused("rate_limited", client_ip, logging.WARNING, by_ip=by_ip, limit=limit)
            return
        # 2. The address, before the global budget: a request that would mail nothing must
        # not spend it. (Checked again, atomically, when the token is stored.)
        issued_since = now - timedelta(seconds=self.settings.login_link_cooldown)
        held, recent = await self.store.login_tokens_held(normalized, now, issued_since)
        if recent or held >= self.settings.login_links_per_address:
            self._address_refused(client_ip, held, recent)
            return
        # 3. The global budget, shared fairly between client networks.
        network = sender_network(client_ip)
        if not await self.store.hit_if(
            (GLOBAL_BUCKET, f"login:net:{network}"), since, now, self._fair
        ):
            total = await self.store.count_recent(GLOBAL_BUCKET, since)
            cap = self.settings.login_emails_per_minute
            self._refused("global_cap", client_ip, logging.WARNING, total=total, cap=cap)
            return
        token = secrets.token_urlsafe(32)
        digest = _digest(token)
        if not await self.store.put_login_token(
            digest,
            normalized,
            now + timedelta(seconds=self.settings.login_token_ttl),
            now,
            max_live=self.settings.login_links_per_address,
            issued_since=issued_since,
        ):
            # A concurrent request for the same address (another worker, another replica)
            # stored its token between step 2 and now.
            self._address_refused(client_ip, held, 1)
            return
        # ``link_base`` may already carry a query (e.g. ``?next=/path``).
        separator = "&" if "?" in link_base else "?"
        try:
            await self.mailer.send_login_link(normalized, f"{link_base}{separator}token={token}")
        except MailError:
            # Never delivered: it must not hold the address's cool-down or one of its slots
            # when the user tries again.
            await self.store.forget_login_token(digest)
            raise
        log_event(log, "login_link", outcome="sent", ip=client_ip)

    def _fair(self, counts: Sequence[int]) -> bool:
        total, by_network = counts
        budget = self.settings.login_emails_per_minute
        return total < shared_mail_budget(self.settings) or (total < budget and by_network == 0)

    def _address_refused(self, client_ip: str, held: int, recent: int) -> None:
        outcome = "cooldown" if recent else "links_held"
        limit = self.settings.login_links_per_address
        self._refused(outcome, client_ip, logging.INFO, held=held, limit=limit)

    def _refused(self, outcome: str, client_ip: str, level: int, **counts: int) -> None:
        log_event(log, "login_link", level=level, outcome=outcome, ip=client_ip, **counts)

    async def redeem(self, token: str) -> Redeemed:
        """Consume a sign-in token: ``ok`` and its email, else why it does not work (``used``
        once already, ``expired``, or ``invalid``: unknown or malformed). A token works once;
        the address's other links keep working."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            return Redeemed("invalid")
        now = self.clock.now()
        digest = _digest(token)
        email = await self.store.consume_login_token(digest, now)
        if email is not None:
            log_event(log, "login_verify", outcome="ok")
            return Redeemed("ok", email)
        fate = await self.store.login_token_fate(digest)
        outcome: Literal["used", "expired", "invalid"] = fate or "invalid"
        log_event(log, "login_verify", outcome=outcome)
        return Redeemed(outcome)

    async def peek(self, token: str) -> str | None:
        """The email a working token signs in, without using it (None: it does not work)."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            return None
        return await self.store.login_token_email(_digest(token), self.clock.now())

    async def verify(self, token: str) -> str | None:
        """The email of a sign-in token (see :meth:`redeem`), or None if it does not work."""
        return (await self.redeem(token)).email
