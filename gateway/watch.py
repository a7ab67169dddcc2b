"""Open WebSockets and streamed responses, re-checked while they last.

An HTTP request is checked once; a WebSocket (Streamlit runs its whole UI over one) or an SSE
stream (an LLM answer) can last for hours. :class:`Watch` keeps every open proxied socket and
stream of a signed-in user with what re-checking it takes: the original request, its
:class:`~gateway.forwarded.ClientInfo` and the user key (``X-Gate-User`` of the allowed
verdict). A re-check asks the gate again, exactly as for a new request on the same cookie:

- at once, when this process announces a change on :class:`~gateway.changes.Changes` (a
  webhook, a refresh, a grant, a revoked session): the sockets of that user, or all of them for
  ``everyone``. The announcer has already dropped L1 and the remembered verdicts
  (``Entitlements._changed``), so the re-check sees the new state;
- otherwise every ``WS_RECHECK_INTERVAL`` per socket, the first one at a random point in the
  second half of the interval so that sockets opened together (a reconnect storm after a
  deploy) do not all re-check in the same tick. This catches what no announcement tells this
  process about (a cancellation whose webhook was lost, once ``L1_TTL``/``CACHE_TTL`` let the
  gate see it; a scheduled end).

A denial ends the socket: a WebSocket is closed with ``4000 + status`` and the reason in plain
text (:func:`close_for`: 4401 ``login required``, 4402 ``subscription required``) on the
client side and the upstream side; a stream is cut (its connection aborted, so the client
sees a truncated body, never a falsely complete one; ``EventSource`` reconnects and gets the
402). ``billing_unavailable`` (Stripe down, nothing known) is *not* a reason to end anything:
whoever was let in keeps the socket until the gate can tell. A re-check that fails (a bug, a
store error) is logged and the socket kept until the next one.

Scheduling uses the event loop's monotonic clock (it is only "when to look again"); what the
gate decides at a re-check uses the services' clock, as for every request. The two tasks, and
the closes they start, belong to the watch: :meth:`Watch.close` cancels and awaits them.

Only what the gate proxies can be watched: behind forward auth (``/_gate/auth``) the front proxy
carries the socket, and the gate cannot close it.
"""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from gateway.changes import Change, Changes
from gateway.forwarded import ClientInfo
from gateway.gate import GateVerdict
from gateway.logs import log_event
from gateway.model import Denial

__all__ = ["Recheck", "Watch", "Watched", "close_for"]

log = logging.getLogger("gateway.watch")

#: The gate, asked again for a watched request (the app's gate hook, see ``gateway.app.Gate``).
Recheck = Callable[[web.Request, ClientInfo], Awaitable[GateVerdict]]
#: Ends a watched socket or stream: ``(close code, reason)``.
Ender = Callable[[int, str], Coroutine[Any, Any, None]]

#: Longest wait between two looks at the schedule (the bound is the interval plus this).
MAX_TICK = 1.0
_CODES = {"login_required": 4401, "subscription_required": 4402}


def close_for(denial: Denial) -> tuple[int, str] | None:
    """The WebSocket close code and reason for a denial at a re-check, or None when the denial
    must not end an open socket (``billing_unavailable``: Stripe down, keep paying users)."""
    if denial.kind == "unavailable" or denial.status >= 500:
        return None
    code = _CODES.get(denial.reason)
    if code is None:
        code = 4000 + denial.status if 400 <= denial.status < 500 else 4400
    return code, denial.reason.replace("_", " ")


@dataclass(eq=False, slots=True)
class Watched:
    """One open socket or stream under watch."""

    request: web.Request
    client: ClientInfo
    user: str
    kind: Literal["websocket", "stream"]
    end: Ender
    due: float = 0.0
    #: Set when a re-check denied it (code, reason); it is being ended.
    ended: tuple[int, str] | None = None
    rechecks: int = field(default=0)


class Watch:
    """The registry of open sockets and streams, and the tasks that re-check them."""

    def __init__(self, recheck: Recheck, interval: float) -> None:
        self._recheck = recheck
        self.interval = interval
        self._tick = min(MAX_TICK, max(interval / 10, 0.01))
        self._entries: set[Watched] = set()
        self._by_user: dict[str, set[Watched]] = {}
        self._pending: set[str] = set()
        self._pending_all = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._unlisten: Callable[[], None] | None = None
        #: Re-checks run / sockets and streams ended by one (for metrics and tests).
        self.rechecks = 0
        self.ended = 0

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, user: str) -> int:
        """Open sockets and streams of ``user`` under watch."""
        return len(self._by_user.get(user, ()))

    # ---------------------------------------------------------------- registry

    def add(
        self,
        request: web.Request,
        client: ClientInfo,
        user: str,
        kind: Literal["websocket", "stream"],
        end: Ender,
    ) -> Watched:
        """Watch one open socket or stream of ``user``; :meth:`remove` it when it ends."""
        first = self.interval * random.uniform(0.5, 1.0)
        watched = Watched(request, client, user, kind, end, _loop_time() + first)
        self._entries.add(watched)
        self._by_user.setdefault(user, set()).add(watched)
        return watched

    def remove(self, watched: Watched) -> None:
        """Stop watching (idempotent)."""
        self._entries.discard(watched)
        mine = self._by_user.get(watched.user)
        if mine is not None:
            mine.discard(watched)
            if not mine:
                del self._by_user[watched.user]

    # ---------------------------------------------------------------- lifecycle

    def listen(self, changes: Changes) -> None:
        """Re-check at once the sockets a change announced on ``changes`` concerns."""
        if self._unlisten is None:
            self._unlisten = changes.listen(self._on_change)

    def start(self) -> None:
        """Start the re-check tasks (in the running loop)."""
        if self._tasks:
            return
        self._tasks.append(asyncio.create_task(self._changes_loop(), name="watch-changes"))
        if self.interval > 0:
            self._tasks.append(asyncio.create_task(self._periodic_loop(), name="watch-periodic"))

    async def close(self) -> None:
        """Stop listening, cancel and await the tasks (and any close still in progress)."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        tasks, self._tasks = self._tasks, []
        tasks.extend(self._closing)
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log_event(log, "watch_task_failed", level=logging.ERROR, error=repr(result))

    # ---------------------------------------------------------------- re-checks

    def _on_change(self, change: Change) -> None:
        # A Changes listener: synchronous and quick; the re-check runs in _changes_loop.
        if change.kind == "customer" and change.key:
            self._pending.add(change.key)
        elif change.kind == "session" and change.user:
            self._pending.add(change.user)
        else:  # everyone, or a session of an unknown user
            self._pending_all = True
        self._wake.set()

    async def _changes_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            users, everyone = self._pending, self._pending_all
            self._pending, self._pending_all = set(), False
            if everyone:
                batch = list(self._entries)
            else:
                batch = [w for user in users for w in self._by_user.get(user, ())]
            await self._recheck_all(batch)

    async def _periodic_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            now = _loop_time()
            await self._recheck_all([w for w in self._entries if w.due <= now])

    async def _recheck_all(self, batch: list[Watched]) -> None:
        if batch:
            await asyncio.gather(*(self._recheck_one(w) for w in batch))

    async def _recheck_one(self, watched: Watched) -> None:
        if watched.ended is not None:
            return
        watched.due = _loop_time() + self.interval
        watched.rechecks += 1
        self.rechecks += 1
        try:
            verdict = await self._recheck(watched.request, watched.client)
        except Exception as exc:  # keep the socket; the next re-check tries again
            log_event(
                log,
                "recheck_failed",
                level=logging.ERROR,
                kind=watched.kind,
                path=watched.request.path,
                error=repr(exc),
            )
            return
        if not isinstance(verdict, Denial) or watched.ended is not None:
            return
        closing = close_for(verdict)
        if closing is None:
            # Stripe down: kept (DEBUG: an outage would log once per socket and interval).
            log_event(
                log, "recheck_kept", level=logging.DEBUG, kind=watched.kind, reason=verdict.reason
            )
            return
        watched.ended = closing
        self.ended += 1
        log_event(
            log,
            "recheck_ended",
            kind=watched.kind,
            path=watched.request.path,
            code=closing[0],
            reason=verdict.reason,
            rid=watched.client.request_id,
        )
        # Closing waits for the client's answer (up to CLOSE_TIMEOUT): not in the batch.
        task = asyncio.create_task(watched.end(*closing), name="watch-end")
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: "asyncio.Task[None]") -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log_event(log, "recheck_end_failed", level=logging.ERROR, error=repr(task.exception()))


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
