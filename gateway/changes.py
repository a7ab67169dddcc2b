"""Announcements of state changes, inside one gate process.

Whoever changes who may get in announces it here, once: :class:`~gateway.entitlement.Entitlements`
for a customer's entitlement (webhook, refresh, grant, deletion), the session store for a
revoked session. Whatever keeps something derived from that state listens: the open WebSockets
and streams (re-checked at once), and, with a shared store, the replica bus that forwards the
change to other replicas (which announce it on their own :class:`Changes` in turn).

Listeners are plain callables run synchronously in the announcer's task, in the order they
were added; they must be quick and must not raise (an exception is logged and the next
listener still runs: one faulty listener must not stop an invalidation).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.logs import log_event

__all__ = ["Change", "Changes", "Listener"]

log = logging.getLogger("gateway.changes")

ChangeKind = Literal["customer", "session", "everyone"]


@dataclass(frozen=True, slots=True)
class Change:
    """What changed.

    - ``customer``: the entitlement or identity of customer ``key`` (a ``cus_…`` id);
    - ``session``: session ``key`` was revoked (``user`` names its user key, when known);
    - ``everyone``: anything may have changed (a grant to an email, missed notifications):
      re-check all.

    ``remote``: announced by :mod:`gateway.replicas` for a change made on *another* replica.
    The caches that drop their entries on a local change themselves (entitlements, sessions)
    drop them on a remote one when they hear it; the bus never sends a remote change on.
    """

    kind: ChangeKind
    key: str = ""
    user: str = ""
    remote: bool = False


Listener = Callable[[Change], None]


class Changes:
    """A synchronous, in-process list of listeners (see the module docstring)."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for every announced change; returns the function that stops it."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    def announce(self, change: Change) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(change)
            except Exception as exc:  # one faulty listener must not stop the others
                log_event(
                    log,
                    "change_listener_failed",
                    level=logging.ERROR,
                    kind=change.kind,
                    error=repr(exc),
                )

    def customer(self, customer_id: str | None) -> None:
        """Customer ``customer_id`` changed (None: someone, unknown who — re-check all)."""
        if customer_id is None:
            self.announce(Change("everyone"))
        else:
            self.announce(Change("customer", customer_id))

    def session(self, session_id: str, user: str = "") -> None:
        """Session ``session_id`` (of user key ``user``) was revoked."""
        self.announce(Change("session", session_id, user))

    def everyone(self) -> None:
        self.announce(Change("everyone"))
