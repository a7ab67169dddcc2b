"""The ``api_keys`` table (:mod:`gateway.apikeys`): one SQL statement per operation, with
PostgreSQL's numbered placeholders, on either backend (:class:`ApiKeyRows` over its
``_select`` / ``_returning`` / ``_execute`` / ``_transaction``, as :mod:`gateway.store.reads`
and :mod:`gateway.store.writes` do).

A row holds the SHA-256 of the key (``key_hash``), never the key. ``revoked_at`` may lie in
the future: a rolled key keeps working until then (the overlap its owner picked)."""

from dataclasses import dataclass
from datetime import datetime

from gateway.store.base import SQL, StoreError, Table, Tx, need

__all__ = ["KEYS_LOCK", "ApiKeyRow", "ApiKeyRows", "TooManyKeys"]

#: :meth:`~gateway.store.base.Tx.lock` space: one customer's keys (the count and the insert
#: it allows do not interleave, on any replica).
KEYS_LOCK = 0x6B657931  # "key1"


class TooManyKeys(StoreError):
    """The customer holds ``MAX_API_KEYS_PER_CUSTOMER`` active keys already."""


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """One API key as stored (no key: its hash)."""

    id: str
    key_hash: str
    customer_id: str
    name: str
    start: str
    created_at: datetime
    expires_at: datetime | None
    last_used: datetime | None
    revoked_at: datetime | None

    def ends_at(self) -> datetime | None:
        """When it stops working: the earlier of its expiry and its (scheduled) revocation."""
        ends = [t for t in (self.expires_at, self.revoked_at) if t is not None]
        return min(ends) if ends else None

    def active(self, now: datetime) -> bool:
        """Whether the key works at ``now``."""
        ends = self.ends_at()
        return ends is None or now < ends


API_KEYS = Table("api_keys", ApiKeyRow)


# An active key at $n: not expired, not (yet) revoked.
_ACTIVE = "(expires_at IS NULL OR expires_at > {n}) AND (revoked_at IS NULL OR revoked_at > {n})"


class ApiKeyRows:
    """The ``api_keys`` reads and writes on one backend. Every failure is a StoreError."""

    def __init__(self, store: SQL) -> None:
        self._db = store

    async def by_hash(self, key_hash: str) -> ApiKeyRow | None:
        """The key whose SHA-256 is ``key_hash`` (active or not), if any."""
        return await self._db._one("api_key_by_hash", API_KEYS, "key_hash = $1", key_hash)

    async def by_id(self, key_id: str) -> ApiKeyRow | None:
        return await self._db._one("api_key_by_id", API_KEYS, "id = $1", key_id)

    async def of_customer(self, customer_id: str, now: datetime) -> list[ApiKeyRow]:
        """The customer's active keys, newest first."""
        return await self._db._all(
            "api_keys_of",
            API_KEYS,
            "customer_id = $1 AND " + _ACTIVE.format(n="$2") + " ORDER BY created_at DESC, id",
            customer_id,
            need(now),
        )

    async def create(self, row: ApiKeyRow, limit: int) -> None:
        """Insert ``row`` unless its customer holds ``limit`` active keys already
        (:class:`TooManyKeys`); counted and inserted in one transaction under the customer's
        lock, so two creations at once on two replicas cannot both pass the count."""
        now = need(row.created_at)

        async def work(tx: Tx) -> None:
            await tx.lock(KEYS_LOCK, row.customer_id)
            held = await tx.fetch(
                "SELECT COUNT(*) AS n FROM api_keys WHERE customer_id = $1 AND "  # noqa: S608
                + _ACTIVE.format(n="$2"),
                row.customer_id,
                now,
            )
            if int(held[0]["n"]) >= limit:
                raise TooManyKeys(f"{row.customer_id} holds {limit} active API keys already")
            await tx.execute(API_KEYS.insert(), *API_KEYS.params(row))

        await self._db._transaction("create_api_key", work)

    async def revoke(self, key_id: str, at: datetime, now: datetime) -> ApiKeyRow | None:
        """Make the key stop working at ``at`` (``now``, or later: the overlap of a roll),
        unless it stops earlier already; the row as it is then if the key was active at
        ``now``, else None."""
        return await self._db._changed_one(
            "revoke_api_key",
            API_KEYS,
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND "
            "(revoked_at IS NULL OR revoked_at > $1) AND (expires_at IS NULL OR expires_at > $3)",
            need(at),
            key_id,
            need(now),
        )

    async def touch(self, key_id: str, at: datetime) -> None:
        """Record that the key was used at ``at`` (the caller writes this rarely)."""
        await self._db._execute(
            "touch_api_key", "UPDATE api_keys SET last_used = $1 WHERE id = $2", need(at), key_id
        )
