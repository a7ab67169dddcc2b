"""What the entitlement package's parts share: error codes, the payload source, the counters,
and the one way a Stripe read of the cache is counted."""

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

from gateway.stripe_api import StripeBreakerOpen

T = TypeVar("T")

ERROR_UNAVAILABLE = "stripe_unavailable"
ERROR_REJECTED = "stripe_rejected"
#: ``Entitlement.source`` of a state applied from a webhook's payload (Stripe unreachable).
PAYLOAD_SOURCE = "webhook_payload"


class StaleEvent(Exception):
    """Stripe is down and an event's payload is not strictly newer than the stored state: it
    cannot be ordered, so the sender must deliver it again (the retry re-reads Stripe)."""


@dataclass
class EntitlementStats:
    """Counters for metrics and tests."""

    l1_hits: int = 0
    l1_misses: int = 0
    store_hits: int = 0
    stripe_calls: int = 0
    stale_served: int = 0
    errors: int = 0
    coalesced: int = 0  # callers that joined an in-flight lookup or sync
    breaker_skips: int = 0  # Stripe calls skipped because the breaker was open
    lease_waits: int = 0  # cold loads answered by another replica's Stripe read
    known_served: int = 0  # L1-expired states served while the store could not be read

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def counted(stats: EntitlementStats, call: Callable[[], Awaitable[T]]) -> T:
    """One Stripe read of the cache, counted in ``stats`` (made, or skipped by the breaker)."""
    try:
        result = await call()
    except StripeBreakerOpen:
        stats.breaker_skips += 1
        raise
    except BaseException:
        stats.stripe_calls += 1
        raise
    stats.stripe_calls += 1
    return result
