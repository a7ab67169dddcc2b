"""The store's writes, written once for both backends: each is one SQL statement, or one
transaction of a few, with PostgreSQL's numbered placeholders (``$1``, ``$2``…; SQLite takes
them as ``?1``, ``?2``…). A backend gives :meth:`SQLWrites._execute`,
:meth:`SQLWrites._returning` and :meth:`SQLWrites._transaction`; where a count and the write
it allows must not interleave with another caller's (sign-in tokens, rate limits), the
transaction takes :meth:`~gateway.store.base.Tx.lock` — SQLite's one writer serializes every
write anyway, PostgreSQL takes an advisory lock that holds across replicas."""

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from gateway.emails import mailbox_key
from gateway.model import Entitlement
from gateway.store.base import (
    COUNT_HITS,
    ENTITLEMENTS,
    EVENTS_RETENTION,
    EXPIRED,
    HITS_RETENTION,
    SESSIONS,
    SQL,
    TOKENS_HELD,
    USED,
    Row,
    SessionRow,
    Tx,
    email_key,
    need,
    subject,
    token_limits,
)
from gateway.store.schema import ENT_UPSERT

__all__ = ["HITS_LOCK", "TOKENS_LOCK", "SQLWrites"]

T = TypeVar("T")

#: :meth:`~gateway.store.base.Tx.lock` spaces: a mailbox's sign-in tokens, a rate-limit bucket.
TOKENS_LOCK = 0x6C6F6731  # "log1"
HITS_LOCK = 0x6C6F6732  # "log2"

_MARK = "INSERT INTO hits (bucket, at) VALUES ($1, $2)"
_TRIM = "DELETE FROM hits WHERE bucket = $1 AND at < $2"
_FORGET_LOOKUP = "DELETE FROM email_lookups WHERE email = $1"


class SQLWrites(SQL):
    """The writes of :class:`~gateway.store.interface.Store` over a backend's
    :meth:`~gateway.store.base.SQL._execute`, ``_returning`` and ``_transaction``."""

    _clock: Callable[[], datetime]

    async def _write_check(self) -> None:
        """One write that commits now (``/readyz``); :class:`StoreError` if it cannot."""
        await self._execute(
            "check_writable",
            "INSERT INTO meta (key, value) VALUES ('write_check', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            str(self._clock().timestamp()),
        )

    # --- entitlements -------------------------------------------------------------------------

    async def put_entitlement(self, ent: Entitlement) -> None:
        await self._execute("put_entitlement", ENT_UPSERT, *ENTITLEMENTS.params(ent))

    async def put_entitlement_if_newer(self, ent: Entitlement, *, strictly: bool = False) -> bool:
        """Write ``ent`` unless the stored one comes from a newer event (webhook ordering);
        True if it was written. One statement: two writers (workers, replicas) for one
        customer at once cannot interleave into the older state.

        ``strictly``: also keep a stored state from the *same* second. A state built from an
        event's payload must be strictly newer: two events of one second cannot be ordered
        (``created`` has whole seconds), while a Stripe read of that second is the truth."""
        op = ">" if strictly else ">="
        sql = ENT_UPSERT + f" WHERE excluded.event_created {op} entitlements.event_created"
        return await self._execute("put_entitlement_if_newer", sql, *ENTITLEMENTS.params(ent)) > 0

    async def delete_entitlement(self, customer_id: str) -> None:
        await self._execute(
            "delete_entitlement", "DELETE FROM entitlements WHERE customer_id = $1", customer_id
        )

    # --- customers ----------------------------------------------------------------------------

    async def put_customer(self, customer_id: str, email: str | None) -> None:
        """Remember a customer (and its email). A known email drops its cached negative lookup."""
        mail = email_key(email) if email else None
        box = mailbox_key(mail) if mail else None
        now = need(self._clock())

        async def work(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO customers (customer_id, email, mailbox, updated_at) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id) DO UPDATE SET "
                "email = COALESCE(excluded.email, customers.email), "
                "mailbox = COALESCE(excluded.mailbox, customers.mailbox), "
                "updated_at = excluded.updated_at",
                customer_id,
                mail,
                box,
                now,
            )
            if mail:
                await tx.execute(_FORGET_LOOKUP, mail)

        await self._transaction("put_customer", work)

    async def forget_customer(self, customer_id: str) -> None:
        """Drop a (deleted) customer: its email mapping, entitlement and cached lookups."""

        async def work(tx: Tx) -> None:
            rows = await tx.fetch(
                "DELETE FROM customers WHERE customer_id = $1 RETURNING email", customer_id
            )
            await tx.execute("DELETE FROM entitlements WHERE customer_id = $1", customer_id)
            for row in rows:
                if row["email"]:
                    await tx.execute(_FORGET_LOOKUP, row["email"])

        await self._transaction("forget_customer", work)

    async def put_email_lookup(
        self, email: str, customer_ids: Sequence[str], checked_at: datetime
    ) -> None:
        await self._execute(
            "put_email_lookup",
            "INSERT INTO email_lookups (email, customer_ids, checked_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (email) DO UPDATE SET customer_ids = excluded.customer_ids, "
            "checked_at = excluded.checked_at",
            email_key(email),
            json.dumps(list(customer_ids)),
            need(checked_at),
        )

    # --- webhook events -----------------------------------------------------------------------

    async def record_event(self, event_id: str, type_: str, created: int) -> bool:
        """Remember a webhook event; False if it was seen before (a duplicate delivery, to
        this process or another: the primary key decides, exactly one insert wins)."""
        changed = await self._execute(
            "record_event",
            "INSERT INTO webhook_events (event_id, type, created, processed_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING",
            event_id,
            type_,
            int(created),
            need(self._clock()),
        )
        return changed > 0

    async def forget_event(self, event_id: str) -> None:
        """Undo :meth:`record_event` (processing failed: let Stripe's retry be processed)."""
        await self._execute(
            "forget_event", "DELETE FROM webhook_events WHERE event_id = $1", event_id
        )

    # --- sign-in ------------------------------------------------------------------------------

    async def put_login_token(
        self,
        token_hash: str,
        email: str,
        expires_at: datetime,
        now: datetime | None = None,
        *,
        max_live: int | None = None,
        issued_since: datetime | None = None,
    ) -> bool:
        """Store a sign-in token issued at ``now``; the address's other tokens keep working.
        With ``max_live`` / ``issued_since``, only if the address holds fewer than ``max_live``
        unexpired tokens, none of them issued after ``issued_since``: counted and written in
        one transaction holding the mailbox's lock, so concurrent requests (other workers and
        replicas too) cannot both pass. True if it was stored."""
        address = email_key(email)
        box = mailbox_key(address)
        now_ts = need(now or self._clock())
        checked, limit, since = token_limits(max_live, issued_since)

        async def work(tx: Tx) -> bool:
            if checked:
                await tx.lock(TOKENS_LOCK, box)
                [row] = await tx.fetch(TOKENS_HELD, box, now_ts, since)
                if int(row["live"]) >= limit or int(row["recent"]) > 0:
                    return False
            await tx.execute(
                "INSERT INTO login_tokens (token_hash, email, mailbox, expires_at, created_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (token_hash) DO UPDATE SET "
                "email = excluded.email, mailbox = excluded.mailbox, "
                "expires_at = excluded.expires_at, created_at = excluded.created_at",
                token_hash,
                address,
                box,
                need(expires_at),
                now_ts,
            )
            return True

        return await self._transaction("put_login_token", work)

    async def forget_login_token(self, token_hash: str) -> None:
        """Delete a token that was never delivered (its mail failed), leaving no mark."""
        await self._execute(
            "forget_login_token", "DELETE FROM login_tokens WHERE token_hash = $1", token_hash
        )

    async def consume_login_token(self, token_hash: str, now: datetime) -> str | None:
        """The token's email if it exists and has not expired. Single use, across workers and
        replicas: one ``DELETE … RETURNING`` hands the row to exactly one caller; it leaves a
        ``used`` (or ``expired``) mark for :meth:`login_token_fate`."""
        stamp = need(now)

        async def work(tx: Tx) -> list[Row]:
            rows = await tx.fetch(
                "DELETE FROM login_tokens WHERE token_hash = $1 RETURNING email, expires_at",
                token_hash,
            )
            if rows:
                fate = USED if float(rows[0]["expires_at"]) > stamp else EXPIRED
                await tx.execute(_MARK, f"{fate}{token_hash}", stamp)
            return rows

        rows = await self._transaction("consume_login_token", work)
        if not rows or float(rows[0]["expires_at"]) <= stamp:
            return None
        return str(rows[0]["email"])

    async def hit(self, bucket: str, at: datetime) -> None:
        stamp = need(at)
        horizon = stamp - HITS_RETENTION.total_seconds()

        async def work(tx: Tx) -> None:
            await tx.execute(_MARK, bucket, stamp)
            await tx.execute(_TRIM, bucket, horizon)

        await self._transaction("hit", work)

    async def hit_if(
        self,
        buckets: Sequence[str],
        since: datetime,
        at: datetime,
        allow: Callable[[Sequence[int]], bool],
    ) -> bool:
        """Count each bucket's hits since ``since``; if ``allow(counts)``, record a hit at
        ``at`` in each and return True. One transaction holding the lock of the first bucket:
        calls sharing it are serialized (across workers and replicas), so their limit holds."""
        since_ts, stamp = need(since), need(at)
        horizon = stamp - HITS_RETENTION.total_seconds()

        async def work(tx: Tx) -> bool:
            if buckets:
                await tx.lock(HITS_LOCK, buckets[0])
            counts = []
            for bucket in buckets:
                [row] = await tx.fetch(COUNT_HITS, bucket, since_ts)
                counts.append(int(row[0]))
            if not allow(counts):
                return False
            for bucket in buckets:
                await tx.execute(_MARK, bucket, stamp)
                await tx.execute(_TRIM, bucket, horizon)
            return True

        return await self._transaction("hit_if", work)

    # --- grants -------------------------------------------------------------------------------

    async def put_grant(self, customer_or_email: str, until: datetime, note: str) -> None:
        await self._execute(
            "put_grant",
            "INSERT INTO grants (subject, until, note, created_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (subject) DO UPDATE SET until = excluded.until, "
            "note = excluded.note, created_at = excluded.created_at",
            subject(customer_or_email),
            need(until),
            note,
            need(self._clock()),
        )

    async def delete_grant(self, customer_or_email: str) -> bool:
        changed = await self._execute(
            "delete_grant", "DELETE FROM grants WHERE subject = $1", subject(customer_or_email)
        )
        return changed > 0

    # --- sessions -----------------------------------------------------------------------------

    async def create_session(self, row: SessionRow) -> None:
        """Insert a new session (its id is fresh: an existing hash is an error, never reused)."""
        email = email_key(row.email) if row.email else None
        await self._execute("create_session", SESSIONS.insert(), *SESSIONS.params(row, email=email))

    async def touch_session(self, id_hash: str, at: datetime) -> None:
        """Record that the session was seen at ``at`` (never moves ``last_seen`` back)."""
        await self._execute(
            "touch_session",
            "UPDATE sessions SET last_seen = $1 "
            "WHERE id_hash = $2 AND revoked_at IS NULL AND last_seen < $1",
            need(at),
            id_hash,
        )

    async def revoke_session(self, id_hash: str, at: datetime) -> SessionRow | None:
        """Revoke one session; the session as it was if it was active, else None."""
        return await self._changed_one(
            "revoke_session",
            SESSIONS,
            "UPDATE sessions SET revoked_at = $1 WHERE id_hash = $2 AND revoked_at IS NULL",
            need(at),
            id_hash,
        )

    async def revoke_sessions_of(self, customer_id: str, at: datetime) -> list[str]:
        """Revoke every session of ``customer_id``; the id hashes of those that were active."""
        rows = await self._returning(
            "revoke_sessions_of",
            "UPDATE sessions SET revoked_at = $1 "
            "WHERE customer_id = $2 AND revoked_at IS NULL RETURNING id_hash",
            need(at),
            customer_id,
        )
        return sorted(str(r["id_hash"]) for r in rows)

    # --- housekeeping -------------------------------------------------------------------------

    async def prune(self, now: datetime) -> int:
        """Delete what has outlived its use (expired tokens, old hits, old event ids, old email
        lookups, expired sessions and leases). Returns the number of rows deleted. Runs when
        the store opens."""
        stamp = need(now)
        hits_horizon = stamp - HITS_RETENTION.total_seconds()
        events_horizon = stamp - EVENTS_RETENTION.total_seconds()
        statements = (
            ("DELETE FROM login_tokens WHERE expires_at <= $1", stamp),
            ("DELETE FROM hits WHERE at < $1", hits_horizon),
            ("DELETE FROM email_lookups WHERE checked_at < $1", hits_horizon),
            ("DELETE FROM webhook_events WHERE processed_at < $1", events_horizon),
            # Expired sessions go; revoked ones stay until they would have expired, so a
            # replayed copy keeps meeting a revoked row (not that it matters: unknown ids are
            # refused too).
            ("DELETE FROM sessions WHERE expires_at <= $1", stamp),
            # Leases are PostgreSQL's (gateway.store.bus); SQLite's table stays empty.
            ("DELETE FROM leases WHERE until < $1", hits_horizon),
        )

        async def work(tx: Tx) -> int:
            total = 0
            for sql, arg in statements:
                total += await tx.execute(sql, arg)
            return total

        return await self._transaction("prune", work)
