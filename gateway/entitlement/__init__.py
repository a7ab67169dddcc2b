"""What a user paid for: a layered cache in front of Stripe, and the one writer of that state.

- :mod:`.lookup` — :class:`Entitlements`: L1 → grants → store → Stripe, the owner of every
  change (``_changed`` drops L1 and the remembered verdicts and announces it), and
  :meth:`~Entitlements.apply_event` (a webhook's event, with the outage policy for its payload,
  :mod:`.events`);
- :mod:`.sync` — serialized, ordered reads of a customer from Stripe into the store;
- :mod:`.emails` — email → customers; :mod:`.grants` — operator grants;
- :mod:`.flights` — singleflight per key; :mod:`.leases` — one replica reads a cold key
  (``Leased.run(name, in_store, read)``), the others wait for it in the store.
"""

from gateway.entitlement.base import (
    ERROR_REJECTED,
    ERROR_UNAVAILABLE,
    PAYLOAD_SOURCE,
    EntitlementStats,
    StaleEvent,
)
from gateway.entitlement.leases import LEASE_POLL, Leases
from gateway.entitlement.lookup import Entitlements

__all__ = [
    "ERROR_REJECTED",
    "ERROR_UNAVAILABLE",
    "LEASE_POLL",
    "PAYLOAD_SOURCE",
    "EntitlementStats",
    "Entitlements",
    "Leases",
    "StaleEvent",
]
