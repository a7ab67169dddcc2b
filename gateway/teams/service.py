"""The teams' service: memberships, invitations and seats, for every page and the request path.

:class:`Teams` keeps the active memberships in memory (email → the team's customer id): the
entitlement cache reads them to pick a member's L1 key without I/O
(:meth:`gateway.entitlement.Entitlements.key_of`) and asks :meth:`Teams.team_of` (one store
read, the truth) on an L1 miss; the gate reads :meth:`Teams.role` for ``X-Gate-Team`` and
``X-Gate-Role``. The map is reloaded after every change made here, on every change of a team's
customer (another replica's too, through the replica bus) and every ``L1_TTL`` (workers of one
host without a bus).

A membership ends (:meth:`Teams.remove`, fewer seats from Stripe, the team's subscription
ending) as a sign-out does: the member's sessions are revoked in the store, refused on this
worker at once and on the others through the announced session changes, and their open
WebSockets and streams are re-checked (the watch keys them on ``X-Gate-User``: the member's
email). After a change of a team's customer (a webhook, a refresh), :meth:`Teams.reconcile`
reads the seat count from Stripe and, when it is below the seats in use, cancels the newest
pending invitations and then suspends the newest members, telling the owner who and why.
"""

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.changes import Change, Changes
from gateway.emails import mailbox_key, valid_email
from gateway.entitlement import Entitlements
from gateway.logs import log_event
from gateway.mailer import Mailer
from gateway.model import SYSTEM_CLOCK, Clock, Identity, Lookup
from gateway.sessions import Sessions
from gateway.settings import Settings
from gateway.signin import GLOBAL_BUCKET, LOGIN_RATE_WINDOW, shared_mail_budget
from gateway.store import Backend, StoreError
from gateway.store.teams import Invitation, Member, TeamRow
from gateway.stripe_api import StripeAPI

__all__ = ["ROLE_MEMBER", "ROLE_OWNER", "Seats", "Teams", "seat_item", "token_digest"]

log = logging.getLogger("gateway.teams")

ROLE_OWNER, ROLE_MEMBER = "owner", "member"
#: How often a member's ``last_seen`` is written (the Team section shows it by the minute).
TOUCH_EVERY = timedelta(minutes=1)
#: Subscription statuses whose seats count (what the access rules may grant).
_SEATED = ("active", "trialing", "past_due")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Seats:
    """A team's seats: paid (Stripe's quantity), used (the owner, the members, the pending
    invitations)."""

    paid: int
    members: list[Member]
    pending: list[Invitation]

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members if m.state == "active"]

    @property
    def used(self) -> int:
        return 1 + len(self.active) + len(self.pending)


def seat_item(
    subscriptions: list[dict[str, Any]], seat_prices: Collection[str]
) -> tuple[str, str, int] | None:
    """The (subscription id, item id, quantity) of the customer's seat subscription: the first
    one with a seat price whose status counts, else None."""
    for sub in subscriptions:
        if sub.get("status") not in _SEATED:
            continue
        items = sub.get("items") or {}
        for item in items.get("data") or ():
            price = item.get("price") or item.get("plan") or {}
            if price.get("id") in seat_prices:
                return str(sub["id"]), str(item["id"]), int(item.get("quantity") or 1)
    return None


@dataclass(eq=False, repr=False)
class Teams:
    """Teams, their members, invitations and seats (see the module docstring)."""

    settings: Settings
    store: Backend
    stripe: StripeAPI
    entitlements: Entitlements
    sessions: Sessions
    mailer: Mailer
    changes: Changes
    clock: Clock = SYSTEM_CLOCK

    def __post_init__(self) -> None:
        self._seat_prices = frozenset(self.settings.seat_price_ids)
        #: Active memberships: email → the team's customer id (read on the request path).
        self.members: dict[str, str] = {}
        self._teams: set[str] = set()  # customers with a team row (seats known)
        self._touched: dict[str, datetime] = {}
        self._pending: set[str] = set()
        self._reload = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unlisten = self.changes.listen(self._on_change)
        self.entitlements.memberships = self.members
        self.entitlements.team_of = self.team_of
        self.entitlements.on_link = self._on_link
        self._own: set[str] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the memberships; start the reload and reconcile loop (in the running loop)."""
        await self.load()
        self._tasks.append(asyncio.create_task(self._loop(), name="teams"))
        interval = max(float(self.settings.l1_ttl), 0.5)
        self._tasks.append(asyncio.create_task(self._tick(interval), name="teams-tick"))

    async def close(self) -> None:
        self._unlisten()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log_event(log, "teams_task_failed", level=logging.ERROR, error=repr(result))

    async def load(self) -> None:
        """Read the active memberships into :attr:`members` (the same dict object: the
        entitlement cache holds it)."""
        pairs = await self.store.active_members()
        fresh = dict(pairs)
        for email in [e for e in self.members if e not in fresh]:
            del self.members[email]
        self.members.update(fresh)
        self._teams.update(fresh.values())

    def _on_change(self, change: Change) -> None:
        # A Changes listener: quick; the work runs in _loop.
        if change.kind == "customer" and change.key:
            if not change.remote and change.key in self._teams:
                self._pending.add(change.key)
            self._reload = True
            self._recheck_members(change.key)
        elif change.kind == "everyone":
            self._reload = True
            self._recheck_members(None)
        else:
            return
        self._wake.set()

    def _on_link(self, customer_id: str, email: str) -> None:
        # An email paid as a customer (Checkout): a member's own subscription?
        address = email.strip().lower()
        team = self.members.get(address)
        if team is not None and team != customer_id:
            self._own.add(address)
            self._wake.set()

    def _recheck_members(self, team: str | None) -> None:
        """Open sockets of the team's members are re-checked (the watch keys them on the
        member's email, not on the team's customer). Announced as remote: for this process's
        listeners only (each replica does it on hearing the team's change)."""
        for email, owner in list(self.members.items()):
            if team is None or owner == team:
                self.changes.announce(Change("session", "", email, remote=True))

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, set()
            own, self._own = self._own, set()
            for email in sorted(own):
                try:
                    await self.own_subscription(email)
                except StoreError as exc:
                    log_event(log, "member_sessions_unended", level=logging.WARNING, error=str(exc))
            for customer_id in sorted(pending):
                try:
                    await self.reconcile(customer_id)
                except Exception as exc:  # a failed read is retried at the next change
                    log_event(
                        log,
                        "team_reconcile_failed",
                        level=logging.WARNING,
                        customer=customer_id,
                        error=repr(exc),
                    )
            if self._reload or pending:
                self._reload = False
                await self._load_logged()

    async def _tick(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._load_logged()

    async def _load_logged(self) -> None:
        try:
            await self.load()
        except StoreError as exc:
            log_event(log, "team_members_unread", level=logging.WARNING, error=str(exc))

    # --- the request path ---------------------------------------------------------------------

    async def team_of(self, email: str) -> str | None:
        """The team ``email`` is an active member of, from the store (an L1 miss of a member:
        the truth, whatever the in-memory map says); writes ``last_seen`` now and then."""
        member = await self.store.team_member(email)
        if member is None or member.state != "active":
            return None
        # Another process (a worker's join, the CLI) may have made it: the in-memory map
        # learns it now, so role() never takes this identity for the owner.
        self.members[email] = member.customer_id
        self._teams.add(member.customer_id)
        now = self.clock.now()
        last = self._touched.get(email) or member.last_seen
        if last is None or now - last >= TOUCH_EVERY:
            self._touched[email] = now
            try:
                await self.store.touch_member(email, now)
            except StoreError as exc:  # only last_seen is lost
                log_event(log, "member_touch_failed", level=logging.WARNING, error=str(exc))
        return member.customer_id

    def is_seat_price(self, price_id: str | None) -> bool:
        return price_id is not None and price_id in self._seat_prices

    def role(self, identity: Identity, lookup: Lookup | None) -> tuple[str, str] | None:
        """``(team customer id, "owner" | "member")`` when ``lookup`` is a team's entitlement
        that ``identity`` has as its owner or a member; None otherwise. No I/O."""
        ent = lookup.entitlement if lookup is not None else None
        if ent is None:
            return None
        if not self.is_seat_price(ent.price_id):
            return None
        if identity.customer_id == ent.customer_id:
            return ent.customer_id, ROLE_OWNER
        email = identity.email
        member = email is not None and self.members.get(email) == ent.customer_id
        # A session naming no customer ("") is a member's (joined, or signed in as one): the
        # in-memory map may not know of a membership another process made a moment ago.
        if member or identity.customer_id == "":
            return ent.customer_id, ROLE_MEMBER
        if identity.customer_id is None:  # an identity header: the email's own customer
            return ent.customer_id, ROLE_OWNER
        return None

    # --- seats --------------------------------------------------------------------------------

    async def team(self, customer_id: str, *, fresh: bool = False) -> TeamRow | None:
        """The team's row (its seat count as last read from Stripe); read from Stripe when
        unknown or ``fresh``. None: the customer has no seat subscription. Raises
        :class:`~gateway.stripe_api.StripeError`, :class:`StoreError`."""
        row = None if fresh else await self.store.get_team(customer_id)
        if row is not None:
            return row
        found = seat_item(await self.stripe.list_subscriptions(customer_id), self._seat_prices)
        if found is None:
            row = await self.store.get_team(customer_id)
            if row is not None:
                await self.store.put_team(customer_id, 0, None, None, self.clock.now())
                self._teams.add(customer_id)
                return await self.store.get_team(customer_id)
            return None
        sub_id, item_id, quantity = found
        await self.store.put_team(customer_id, quantity, sub_id, item_id, self.clock.now())
        self._teams.add(customer_id)
        return await self.store.get_team(customer_id)

    async def seats(self, customer_id: str) -> Seats:
        """Seats paid and used. Raises :class:`StoreError`."""
        row = await self.store.get_team(customer_id)
        members = await self.store.team_members(customer_id)
        pending = await self.store.pending_invitations(customer_id, self.clock.now())
        return Seats(row.seats if row is not None else 1, members, pending)

    async def reconcile(self, customer_id: str) -> list[str]:
        """After a change of a team's customer: read its seats from Stripe; with fewer seats
        than in use, cancel the newest pending invitations, then suspend the newest members
        (the owner is told who and why); with no seat subscription left, end the members'
        sessions. Returns the emails that lost access."""
        before = await self.store.get_team(customer_id)
        row = await self.team(customer_id, fresh=True)
        if row is None:
            return []
        seats = await self.seats(customer_id)
        lost: list[str] = []
        if row.seats == 0:  # the subscription ended: members are out with it
            if before is not None and before.seats > 0:
                for member in seats.active:
                    await self._end_sessions(member.email)
                log_event(log, "team_ended", customer=customer_id, members=len(seats.active))
            return []
        excess = seats.used - row.seats
        if excess <= 0:
            return []
        for inv in reversed(seats.pending):
            if excess <= 0:
                break
            await self.store.cancel_invitations(customer_id, inv.email)
            excess -= 1
        newest = sorted(seats.active, key=lambda m: (m.joined_at, m.email), reverse=True)
        for member in newest[:excess]:
            lost.append(member.email)
        if lost:
            reason = f"Seats were lowered to {row.seats} in Stripe"
            await self.store.suspend_members(customer_id, lost, reason)
            await self.store.set_team_notice(
                customer_id,
                f"{reason}: {', '.join(lost)} lost access (newest members first). Add seats "
                "to let them back in, or remove them.",
            )
            for email in lost:
                self.members.pop(email, None)
                await self._end_sessions(email)
            self.entitlements.forget(customer_id)
        log_event(log, "team_seats_lowered", customer=customer_id, seats=row.seats, lost=len(lost))
        return lost

    # --- invitations --------------------------------------------------------------------------

    async def invite(
        self, owner: str, inviter: str, email: str, link_base: str
    ) -> tuple[str, str | None]:
        """Invite ``email`` to the team of ``owner``: the outcome (``invited``, ``no_seat``,
        ``member``, ``other_team``, ``rate_limited``, ``invalid_email``, ``no_team``) and the
        link sent (for the CLI). Raises StripeError, StoreError, MailError."""
        address = valid_email(email)
        if address is None:
            return "invalid_email", None
        team = await self.team(owner)
        if team is None or team.seats == 0:
            return "no_team", None
        now = self.clock.now()
        since = now - LOGIN_RATE_WINDOW
        limit = self.settings.login_rate_limit
        # Only the shared part of the global mail budget: the rest stays for sign-in links
        # from networks that had none, so owners who invite can never hold everyone's sign-in
        # refused.
        shared = shared_mail_budget(self.settings)

        def allow(counts: Sequence[int]) -> bool:
            return counts[0] < limit and counts[1] < shared

        # An address gets an invitation mail at most once per LOGIN_LINK_COOLDOWN, as a
        # sign-in link (a new invitation replaces the pending one: no seat would stop it).
        to_address = f"team:invite:to:{mailbox_key(address)}"  # one inbox: +tags, Gmail dots
        cooldown = timedelta(seconds=self.settings.login_link_cooldown)
        if await self.store.count_recent(to_address, now - cooldown):
            log_event(log, "team_invitation", outcome="rate_limited", customer=owner)
            return "rate_limited", None
        buckets = (f"team:invite:{owner}", GLOBAL_BUCKET, to_address)
        if not await self.store.hit_if(buckets, since, now, allow):
            log_event(log, "team_invitation", outcome="rate_limited", customer=owner)
            return "rate_limited", None
        token = secrets.token_urlsafe(32)
        ttl = timedelta(seconds=self.settings.invite_ttl)
        outcome = await self.store.create_invitation(
            owner, address, token_digest(token), team.seats, now, now + ttl
        )
        if outcome != "invited":
            log_event(log, "team_invitation", outcome=outcome, customer=owner)
            return outcome, None
        link = f"{link_base}?token={token}"
        await self.mailer.send_invitation(address, link, inviter)
        log_event(log, "team_invitation", outcome="sent", customer=owner)
        return "invited", link

    async def invitation(self, token: str) -> Invitation | None:
        """The pending invitation of ``token`` (GET: never consumed), or None."""
        if not token or len(token) > 128:
            return None
        inv = await self.store.invitation(token_digest(token))
        if inv is None or not inv.pending(self.clock.now()):
            return None
        return inv

    async def accept(self, token: str) -> tuple[str, Invitation | None]:
        """Use an invitation once: ``joined`` (the email is now a member), ``used`` (already
        used, canceled or expired: nothing happens), ``invalid``, ``no_seat``, ``other_team``."""
        if not token or len(token) > 128:
            return "invalid", None
        digest = token_digest(token)
        known = await self.store.invitation(digest)
        if known is None:
            return "invalid", None
        now = self.clock.now()
        inv = await self.store.use_invitation(digest, now)
        if inv is None:
            return "used", known
        team = await self.store.get_team(inv.customer_id)
        seats = team.seats if team is not None else 0
        outcome = await self.store.add_member(inv.customer_id, inv.email, seats, now)
        if outcome != "added":
            log_event(log, "team_join", outcome=outcome, customer=inv.customer_id)
            return outcome, inv
        self.members[inv.email] = inv.customer_id
        self._teams.add(inv.customer_id)
        self.entitlements.forget(inv.customer_id)  # the member's "no access" entries go too
        log_event(log, "team_join", outcome="joined", customer=inv.customer_id)
        return "joined", inv

    async def cancel_invitation(self, owner: str, email: str) -> bool:
        address = valid_email(email) or email
        return await self.store.cancel_invitations(owner, address) > 0

    # --- members ------------------------------------------------------------------------------

    async def add(self, owner: str, email: str) -> str:
        """Make ``email`` a member at once (``gateway team add``): ``added``, ``no_seat``,
        ``other_team``, ``invalid_email``, ``no_team``."""
        address = valid_email(email)
        if address is None:
            return "invalid_email"
        team = await self.team(owner, fresh=True)
        if team is None or team.seats == 0:
            return "no_team"
        outcome = await self.store.add_member(owner, address, team.seats, self.clock.now())
        if outcome == "added":
            await self.store.cancel_invitations(owner, address)
            self.members[address] = owner
            self.entitlements.forget(owner)
        return outcome

    async def remove(self, owner: str, email: str) -> bool:
        """Remove a member (or a suspended one): their sessions end everywhere, their sockets
        close. Whether they were in the team."""
        address = valid_email(email) or email.strip().lower()
        removed = await self.store.remove_member(owner, address)
        await self.store.cancel_invitations(owner, address)
        if not removed:
            return False
        self.members.pop(address, None)
        await self._end_sessions(address)
        self.entitlements.forget(owner)
        log_event(log, "team_member_removed", customer=owner)
        return True

    async def _end_sessions(self, email: str) -> None:
        """The member's sessions end: revoked in the store, dropped here, announced (other
        workers and replicas, open sockets of ``email``)."""
        handles = await self.store.revoke_sessions_of_email(email, self.clock.now())
        self.sessions.revoked(handles, email)
        self.changes.announce(Change("session", "", email))

    async def own_subscription(self, email: str) -> None:
        """``email`` (a member) now pays for their own subscription: their sessions end, so
        that their next sign-in gets the best of both (see ``docs``: the best access wins)."""
        if email in self.members:
            await self._end_sessions(email)
            self.entitlements.forget(self.members[email])
