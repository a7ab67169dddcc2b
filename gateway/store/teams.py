"""The teams' rows in the store, written once for both backends (a mixin of
:class:`~gateway.store.sqlite.SQLiteStore` and :class:`~gateway.store.postgres.PostgresStore`
over their ``_select`` / ``_execute`` / ``_returning`` / ``_transaction``).

Three tables: ``teams`` (a paying customer's seats, as last read from Stripe), ``team_members``
(one row per email: a person belongs to one team at most; ``state`` ``active`` or
``suspended``, with the ``reason`` the owner is shown) and ``team_invitations`` (single-use,
expiring; only the SHA-256 of the token is kept). Taking a seat — inviting, accepting — is one
transaction holding the team's lock, so two invitations cannot both take the last seat, even on
two replicas."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gateway.store.base import SQL, Table, Tx, need

__all__ = ["TEAM_LOCK", "Invitation", "Member", "TeamRow", "TeamRows"]

#: :meth:`~gateway.store.base.Tx.lock` space of a team's seats.
TEAM_LOCK = 0x7465616D  # "team"

MemberState = Literal["active", "suspended"]


@dataclass(frozen=True, slots=True)
class TeamRow:
    customer_id: str
    seats: int
    subscription_id: str | None
    item_id: str | None
    notice: str  # what the owner is told about the last change from Stripe ("" none)
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Member:
    email: str
    customer_id: str
    state: MemberState
    joined_at: datetime
    last_seen: datetime | None
    reason: str


@dataclass(frozen=True, slots=True)
class Invitation:
    token_hash: str
    customer_id: str
    email: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    canceled: bool

    def pending(self, now: datetime) -> bool:
        return self.used_at is None and not self.canceled and self.expires_at > now


TEAMS = Table("teams", TeamRow)
MEMBERS = Table("team_members", Member)
INVITATIONS = Table("team_invitations", Invitation)
_ACTIVE_COUNT = "SELECT COUNT(*) FROM team_members WHERE customer_id = $1 AND state = 'active'"
_PENDING_COUNT = (
    "SELECT COUNT(*) FROM team_invitations WHERE customer_id = $1 AND used_at IS NULL "
    "AND canceled = 0 AND expires_at > $2"
)


async def _count(tx: Tx, sql: str, *args: Any) -> int:
    [row] = await tx.fetch(sql, *args)
    return int(row[0])


class TeamRows(SQL):
    """The team operations of a store (see the module docstring). Raises
    :class:`~gateway.store.StoreError` as every store call does."""

    # --- teams --------------------------------------------------------------------------------

    async def get_team(self, customer_id: str) -> TeamRow | None:
        return await self._one("get_team", TEAMS, "customer_id = $1", customer_id)

    async def put_team(
        self,
        customer_id: str,
        seats: int,
        subscription_id: str | None,
        item_id: str | None,
        at: datetime,
    ) -> None:
        await self._execute(
            "put_team",
            "INSERT INTO teams (customer_id, seats, subscription_id, item_id, updated_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id) DO UPDATE SET "
            "seats = excluded.seats, subscription_id = excluded.subscription_id, "
            "item_id = excluded.item_id, updated_at = excluded.updated_at",
            customer_id,
            seats,
            subscription_id,
            item_id,
            need(at),
        )

    async def set_team_notice(self, customer_id: str, notice: str) -> None:
        await self._execute(
            "set_team_notice",
            "UPDATE teams SET notice = $1 WHERE customer_id = $2",
            notice,
            customer_id,
        )

    # --- members ------------------------------------------------------------------------------

    async def team_members(self, customer_id: str) -> list[Member]:
        """The team's members (active and suspended), oldest first."""
        return await self._all(
            "team_members", MEMBERS, "customer_id = $1 ORDER BY joined_at, email", customer_id
        )

    async def team_member(self, email: str) -> Member | None:
        return await self._one("team_member", MEMBERS, "email = $1", email)

    async def active_members(self) -> list[tuple[str, str]]:
        """Every active membership, as (email, team customer id): what the request path keeps
        in memory."""
        rows = await self._select(
            "active_members",
            "SELECT email, customer_id FROM team_members WHERE state = 'active'",
        )
        return [(str(r["email"]), str(r["customer_id"])) for r in rows]

    async def add_member(self, customer_id: str, email: str, seats: int, at: datetime) -> str:
        """Make ``email`` an active member of the team if a seat is free (the owner takes one;
        pending invitations other than this email's count): ``added``, ``no_seat`` or
        ``other_team`` (the email is in another team). One transaction under the team's lock."""

        async def work(tx: Tx) -> str:
            await tx.lock(TEAM_LOCK, customer_id)
            rows = await tx.fetch(
                "SELECT customer_id, state FROM team_members WHERE email = $1", email
            )
            if rows and rows[0]["customer_id"] != customer_id:
                return "other_team"
            if rows and rows[0]["state"] == "active":
                return "added"
            used = 1 + await _count(tx, _ACTIVE_COUNT, customer_id)
            used += await _count(
                tx, _PENDING_COUNT + " AND email <> $3", customer_id, need(at), email
            )
            if used >= seats:
                return "no_seat"
            await tx.execute("DELETE FROM team_members WHERE email = $1", email)
            await tx.execute(
                f"INSERT INTO team_members ({MEMBERS.columns}) "  # noqa: S608
                "VALUES ($1, $2, 'active', $3, NULL, '')",
                email,
                customer_id,
                need(at),
            )
            return "added"

        return await self._transaction("add_member", work)

    async def remove_member(self, customer_id: str, email: str) -> bool:
        """Remove ``email`` from the team; whether it was a member."""
        changed = await self._execute(
            "remove_member",
            "DELETE FROM team_members WHERE email = $1 AND customer_id = $2",
            email,
            customer_id,
        )
        return changed > 0

    async def suspend_members(self, customer_id: str, emails: list[str], reason: str) -> None:
        for email in emails:
            await self._execute(
                "suspend_member",
                "UPDATE team_members SET state = 'suspended', reason = $1 "
                "WHERE email = $2 AND customer_id = $3",
                reason,
                email,
                customer_id,
            )

    async def touch_member(self, email: str, at: datetime) -> None:
        await self._execute(
            "touch_member",
            "UPDATE team_members SET last_seen = $1 WHERE email = $2",
            need(at),
            email,
        )

    # --- invitations --------------------------------------------------------------------------

    async def create_invitation(
        self,
        customer_id: str,
        email: str,
        token_hash: str,
        seats: int,
        at: datetime,
        expires_at: datetime,
    ) -> str:
        """Store an invitation of ``email`` if a seat is free: ``invited``, ``no_seat``,
        ``member`` (already in this team) or ``other_team``. A new invitation of the same email
        replaces its pending one (one seat per person). One transaction under the team's lock."""

        async def work(tx: Tx) -> str:
            await tx.lock(TEAM_LOCK, customer_id)
            rows = await tx.fetch(
                "SELECT customer_id, state FROM team_members WHERE email = $1", email
            )
            if rows:
                return "member" if rows[0]["customer_id"] == customer_id else "other_team"
            await tx.execute(
                "UPDATE team_invitations SET canceled = 1 WHERE customer_id = $1 AND email = $2 "
                "AND used_at IS NULL",
                customer_id,
                email,
            )
            used = 1 + await _count(tx, _ACTIVE_COUNT, customer_id)
            used += await _count(tx, _PENDING_COUNT, customer_id, need(at))
            if used >= seats:
                return "no_seat"
            await tx.execute(
                f"INSERT INTO team_invitations ({INVITATIONS.columns}) "  # noqa: S608
                "VALUES ($1, $2, $3, $4, $5, NULL, 0)",
                token_hash,
                customer_id,
                email,
                need(at),
                need(expires_at),
            )
            return "invited"

        return await self._transaction("create_invitation", work)

    async def invitation(self, token_hash: str) -> Invitation | None:
        return await self._one("invitation", INVITATIONS, "token_hash = $1", token_hash)

    async def use_invitation(self, token_hash: str, at: datetime) -> Invitation | None:
        """Mark a pending invitation used (once: a second call gets None); the invitation."""
        return await self._changed_one(
            "use_invitation",
            INVITATIONS,
            "UPDATE team_invitations SET used_at = $1 WHERE token_hash = $2 "
            "AND used_at IS NULL AND canceled = 0 AND expires_at > $1",
            need(at),
            token_hash,
        )

    async def pending_invitations(self, customer_id: str, now: datetime) -> list[Invitation]:
        return await self._all(
            "pending_invitations",
            INVITATIONS,
            "customer_id = $1 AND used_at IS NULL AND canceled = 0 AND expires_at > $2 "
            "ORDER BY created_at",
            customer_id,
            need(now),
        )

    async def cancel_invitations(self, customer_id: str, email: str) -> int:
        return await self._execute(
            "cancel_invitations",
            "UPDATE team_invitations SET canceled = 1 WHERE customer_id = $1 AND email = $2 "
            "AND used_at IS NULL AND canceled = 0",
            customer_id,
            email,
        )

    # --- sessions of a member -----------------------------------------------------------------

    async def revoke_sessions_of_email(self, email: str, at: datetime) -> list[str]:
        """Revoke every session signed in as ``email``; the id hashes of those that were
        active (a removed member's, whichever customer they name)."""
        rows = await self._returning(
            "revoke_sessions_of_email",
            "UPDATE sessions SET revoked_at = $1 "
            "WHERE email = $2 AND revoked_at IS NULL RETURNING id_hash",
            need(at),
            email,
        )
        return sorted(str(r["id_hash"]) for r in rows)
