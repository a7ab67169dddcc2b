"""An async token bucket: the process-wide brake in front of Stripe's API.

Stripe allows 100 requests/s in live mode and 25 in test mode; the gate stays below that
(``Settings.stripe_rate``) so a burst of cold cache misses queues here instead of earning 429s.
"""

import asyncio
import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; :meth:`acquire` waits its turn.

    Waiters are served first come, first served (``asyncio.Lock`` is fair), so a steady overload
    becomes a queue with bounded throughput rather than a thundering herd.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self) -> bool:
        """Take a token if one is available now (never waits)."""
        if self._lock.locked():
            return False  # others are queued: do not jump the line
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> float:
        """Take one token, waiting as long as needed. Returns the seconds waited."""
        waited = 0.0
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                # Sleeping here is the rate limit itself (not a readiness wait); the lock keeps
                # later callers queued behind this one.
                delay = (1 - self._tokens) / self.rate
                await asyncio.sleep(delay)
                waited = delay
                self._refill()
            self._tokens -= 1
        return waited
