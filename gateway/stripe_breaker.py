"""The circuit breaker in front of Stripe: after :data:`BREAKER_THRESHOLD` consecutive
transient failures the calls are skipped for :data:`BREAKER_COOLDOWN` seconds, then one probe goes
through. :class:`~gateway.stripe_client.StripeClientAPI` asks it before every request."""

import logging
from typing import Literal

from gateway.logs import log_event
from gateway.model import SYSTEM_CLOCK, Clock

__all__ = ["BREAKER_COOLDOWN", "BREAKER_THRESHOLD", "BreakerState", "CircuitBreaker"]

log = logging.getLogger("gateway.stripe")

#: Consecutive transient Stripe failures that open the circuit breaker.
BREAKER_THRESHOLD = 5
#: Seconds the breaker stays open before one probe call is let through.
BREAKER_COOLDOWN = 30.0

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Stops calling a failing Stripe for a while.

    closed → (``threshold`` consecutive failures) → open → (``cooldown`` elapsed) → half_open:
    one probe call is allowed; its success closes the breaker, its failure re-opens it. State
    changes are logged once each.
    """

    def __init__(
        self,
        threshold: int = BREAKER_THRESHOLD,
        cooldown: float = BREAKER_COOLDOWN,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.threshold = threshold
        self.cooldown = float(cooldown)
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # times opened, for metrics

    @property
    def state(self) -> BreakerState:
        if (
            self._state == "open"
            and self._opened_at is not None
            and self._clock.time() >= self._opened_at + self.cooldown
        ):
            self._set("half_open")
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to Stripe now (in half-open state: the one probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state != "closed":
            self._opened_at = None
            self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self._state == "half_open" or (
            self._state == "closed" and self._failures >= self.threshold
        ):
            self._opened_at = self._clock.time()
            self.opened += 1
            self._set("open")

    def release(self) -> None:
        """A call ended without a verdict (cancelled): let another probe through."""
        self._probing = False

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            level = logging.WARNING if state == "open" else logging.INFO
            log_event(
                log,
                "stripe_breaker",
                level=level,
                state=state,
                failures=self._failures,
                cooldown_s=self.cooldown,
            )
