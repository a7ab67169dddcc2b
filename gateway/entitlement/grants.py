"""Operator grants (``gateway grant`` / ``revoke``): access to a customer id or an email until a
date, winning over Stripe. Read here, as an :class:`~gateway.model.Entitlement` the rules know
(``source="grant"``); written by :class:`~gateway.entitlement.Entitlements` (which announces the
change)."""

import logging
from datetime import datetime, timedelta

from gateway.logs import log_event
from gateway.model import Clock, Entitlement
from gateway.store import Grant, Store, StoreError

log = logging.getLogger("gateway.entitlement")


class Grants:
    """The store's grants, as entitlements."""

    def __init__(self, store: Store, clock: Clock, cache_ttl: timedelta) -> None:
        self._store = store
        self._now = clock.now
        self._cache_ttl = cache_ttl

    async def active(self, subject: str) -> Grant | None:
        """The grant of a customer id or an email while it lasts, else None (a store failure
        is logged and counts as none: Stripe still answers)."""
        try:
            grant = await self._store.get_grant(subject)
        except StoreError as exc:
            log_event(log, "store_read_failed", level=logging.WARNING, op="grant", error=str(exc))
            return None
        if grant is None or grant.until <= self._now():
            return None
        return grant

    def entitlement(self, customer_id: str, grant: Grant) -> Entitlement:
        """What ``grant`` gives ``customer_id`` now (cached no longer than ``CACHE_TTL``)."""
        now = self._now()
        return Entitlement(
            customer_id=customer_id,
            status="active",
            checked_at=now,
            expires_at=min(grant.until, now + self._cache_ttl),
            period_end=grant.until,
            source="grant",
        )

    async def put(self, subject: str, until: datetime, note: str) -> None:
        await self._store.put_grant(subject, until, note)

    async def delete(self, subject: str) -> bool:
        return await self._store.delete_grant(subject)
