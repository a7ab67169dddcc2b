"""Email → Stripe customers: from the store, else from Stripe (then remembered, an empty
answer for ``NEGATIVE_CACHE_TTL``), one read at a time per email (singleflight, and across
replicas with leases)."""

import functools
import logging
from datetime import timedelta
from typing import Any

from gateway.entitlement.base import EntitlementStats, counted
from gateway.entitlement.flights import Flights
from gateway.entitlement.leases import Leased
from gateway.logs import log_event
from gateway.model import Clock
from gateway.store import Store, StoreError, email_key
from gateway.stripe_api import StripeAPI

log = logging.getLogger("gateway.entitlement")


class EmailCustomers:
    """Which customers pay with an email address (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        stripe: StripeAPI,
        clock: Clock,
        negative_ttl: timedelta,
        stats: EntitlementStats,
        flights: Flights,
        leased: Leased,
    ) -> None:
        self._store = store
        self._stripe = stripe
        self._now = clock.now
        self._negative_ttl = negative_ttl
        self._stats = stats
        self._flights = flights
        self._leased = leased

    async def customers(self, email: str, *, fresh: bool = False) -> list[str]:
        """The Stripe customers with this email (see
        :meth:`gateway.entitlement.Entitlements.customers_for_email`). Raises
        :class:`~gateway.stripe_api.StripeError`."""
        mail = email_key(email)
        if not mail:
            return []
        as_given = email.strip()
        if fresh:
            found = await self._resolve(mail, as_given)
            try:
                known = await self._store.customer_ids_for_email(mail)
            except StoreError as exc:
                log_event(
                    log, "store_read_failed", level=logging.WARNING, op="email", error=str(exc)
                )
                known = []
            return list(dict.fromkeys([*found, *known]))
        stored = await self._in_store(mail)
        if stored is not None:
            return stored
        read = functools.partial(
            self._leased.run,
            f"mail:{mail}",
            functools.partial(self._in_store, mail),
            functools.partial(self._resolve, mail, as_given),
        )
        return await self._flights.run(f"mail:{mail}", read)

    async def _in_store(self, mail: str) -> list[str] | None:
        """The email's customers as stored (or its remembered "none" within
        ``NEGATIVE_CACHE_TTL``), else None; a store failure is None (logged)."""
        try:
            ids = await self._store.customer_ids_for_email(mail)
            if ids:
                return ids
            cached = await self._store.email_lookup_cached(mail)
        except StoreError as exc:
            log_event(log, "store_read_failed", level=logging.WARNING, op="email", error=str(exc))
            return None
        if cached is not None and self._now() - cached[1] < self._negative_ttl:
            return cached[0]
        return None

    async def _resolve(self, mail: str, as_given: str) -> list[str]:
        """Ask Stripe for the email's customers and remember the answer (even an empty one).

        Stripe matches emails case-sensitively: the address is asked as given, then lower-cased
        if that differs and found nothing (the gate itself creates customers lower-cased)."""
        found: list[dict[str, Any]] = []
        for query in dict.fromkeys((as_given, mail)):
            found = await counted(
                self._stats, functools.partial(self._stripe.find_customers, query)
            )
            if found:
                break
        ids = [c["id"] for c in found if isinstance(c.get("id"), str)]
        try:
            for customer_id in ids:
                await self._store.put_customer(customer_id, mail)
            await self._store.put_email_lookup(mail, ids, self._now())
        except StoreError as exc:
            log_event(log, "store_write_failed", level=logging.WARNING, op="email", error=str(exc))
        return ids
