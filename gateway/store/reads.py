"""The store's reads, written once for both backends: each is one SQL statement with
PostgreSQL's numbered placeholders (``$1``, ``$2``…; SQLite takes them as ``?1``, ``?2``…)
and a conversion of its rows. A backend gives :meth:`SQLReads._select`."""

from datetime import datetime

from gateway.emails import mailbox_key
from gateway.model import Entitlement
from gateway.store.base import (
    COUNT_HITS,
    ENTITLEMENTS,
    GRANTS,
    LIST_CUSTOMERS,
    SESSIONS,
    SQL,
    TOKENS_HELD,
    Grant,
    SessionRow,
    TokenFate,
    email_key,
    fate_buckets,
    fate_from,
    lookup_from,
    need,
    subject,
)

__all__ = ["SQLReads"]


class SQLReads(SQL):
    """The reads of :class:`~gateway.store.interface.Store` over :meth:`_select`."""

    async def get_entitlement(self, customer_id: str) -> Entitlement | None:
        return await self._one("get_entitlement", ENTITLEMENTS, "customer_id = $1", customer_id)

    async def _customer_ids(self, op: str, column: str, value: str) -> list[str]:
        rows = await self._select(
            op,
            f"SELECT customer_id FROM customers WHERE {column} = $1 "  # noqa: S608 - a constant
            "ORDER BY updated_at DESC, customer_id",
            value,
        )
        return [r["customer_id"] for r in rows]

    async def customer_ids_for_email(self, email: str) -> list[str]:
        return await self._customer_ids("customer_ids_for_email", "email", email_key(email))

    async def customer_email(self, customer_id: str) -> str | None:
        """The email linked to ``customer_id`` (as Stripe has it: not verified by the gate)."""
        rows = await self._select(
            "customer_email", "SELECT email FROM customers WHERE customer_id = $1", customer_id
        )
        return rows[0]["email"] if rows and rows[0]["email"] else None

    async def customer_ids_for_mailbox(self, email: str) -> list[str]:
        """The customers whose email lands in the same mailbox as ``email``
        (:func:`gateway.emails.mailbox_key`: ``a+x@…`` and ``a@…``), most recent first."""
        return await self._customer_ids("customer_ids_for_mailbox", "mailbox", mailbox_key(email))

    async def list_customers(self) -> list[str]:
        rows = await self._select("list_customers", LIST_CUSTOMERS)
        return [r[0] for r in rows]

    async def email_lookup_cached(self, email: str) -> tuple[list[str], datetime] | None:
        """The customers Stripe had for ``email`` and when it was asked, if it was."""
        rows = await self._select(
            "email_lookup_cached",
            "SELECT customer_ids, checked_at FROM email_lookups WHERE email = $1",
            email_key(email),
        )
        return lookup_from(rows)

    async def has_event(self, event_id: str) -> bool:
        """Whether :meth:`record_event` has seen ``event_id``."""
        rows = await self._select(
            "has_event", "SELECT 1 FROM webhook_events WHERE event_id = $1", event_id
        )
        return bool(rows)

    async def count_recent(self, bucket: str, since: datetime) -> int:
        rows = await self._select("count_recent", COUNT_HITS, bucket, need(since))
        return int(rows[0][0])

    async def get_grant(self, customer_or_email: str) -> Grant | None:
        """The grant for a customer id or an email (expired ones too: compare ``until``)."""
        return await self._one("get_grant", GRANTS, "subject = $1", subject(customer_or_email))

    async def list_grants(self) -> list[Grant]:
        return await self._all("list_grants", GRANTS, "TRUE ORDER BY subject")

    async def get_session(self, id_hash: str) -> SessionRow | None:
        """The session with this id hash (revoked and expired ones too: see ``active``)."""
        return await self._one("get_session", SESSIONS, "id_hash = $1", id_hash)

    async def active_sessions(self, customer_id: str, now: datetime) -> list[SessionRow]:
        """The customer's sessions that are neither revoked nor expired, most recent first."""
        return await self._all(
            "active_sessions",
            SESSIONS,
            "customer_id = $1 AND revoked_at IS NULL AND expires_at > $2 "
            "ORDER BY last_seen DESC, created_at DESC",
            customer_id,
            need(now),
        )

    async def login_token_email(self, token_hash: str, now: datetime) -> str | None:
        """The email of an unused, unexpired sign-in token, without using it up (the confirm
        page names the account before the click that consumes it)."""
        rows = await self._select(
            "login_token_email",
            "SELECT email FROM login_tokens WHERE token_hash = $1 AND expires_at > $2",
            token_hash,
            need(now),
        )
        return str(rows[0]["email"]) if rows else None

    async def login_token_fate(self, token_hash: str) -> TokenFate | None:
        """Why a token that :meth:`consume_login_token` refused does not work, if known (the
        marks live as long as rate-limit hits, :data:`HITS_RETENTION`); None: never issued."""
        rows = await self._select(
            "login_token_fate",
            "SELECT bucket FROM hits WHERE bucket IN ($1, $2) ORDER BY at DESC LIMIT 1",
            *fate_buckets(token_hash),
        )
        return fate_from(rows, token_hash)

    async def login_tokens_held(
        self, email: str, now: datetime, issued_since: datetime
    ) -> tuple[int, int]:
        """How many sign-in tokens the mailbox of ``email`` (:func:`gateway.emails.mailbox_key`:
        its sub-addresses count together) holds unexpired at ``now``, and how many of them were
        issued after ``issued_since``."""
        rows = await self._select(
            "login_tokens_held", TOKENS_HELD, mailbox_key(email), need(now), need(issued_since)
        )
        return int(rows[0]["live"]), int(rows[0]["recent"])
