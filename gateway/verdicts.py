"""Allowed verdicts of cookie sessions, remembered per raw ``Cookie`` header (the gate's hot path).

A paying user's requests all carry the same ``Cookie`` header, and the gate's answer for them —
allowed, with these ``X-Gate-*`` headers — depends only on that header (the session cookie in
it: who), on the user's L1 entitlement entry (what they paid for) and on the time. So once
:func:`gateway.gate.check` has allowed a session, the answer is kept here, keyed by the raw
header, and the next requests skip cookie parsing, the session and entitlement caches, the
access rules and the decision.

A remembered verdict is used only while all of these hold:

- the L1 entry it was derived from is still *the* cached one (``L1Hold.entry.live``): a new
  Stripe read, :meth:`~gateway.entitlement.Entitlements.forget` or ``refresh`` (webhooks,
  checkout success), ``apply_if_newer``, eviction and expiry all end it at once;
- the time is before ``until``: the earliest of the L1 entry's end (``L1_TTL``, never past the
  entitlement's cache lifetime), the session cookie's end (``SESSION_LIFETIME``) and the end of
  the access itself (cancellation, trial end, grace end, grant end).

Only allowed verdicts of cookie sessions are kept; path checks (malformed, public) still run for
every request, before this cache is asked. Hits count as L1 hits (``l1_hits``) and keep the L1
entry recently used, as an ordinary hit would.
"""

import time
from collections.abc import Callable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.entitlement import EntitlementStats, L1Entry, L1Hold

__all__ = ["MAX_VERDICTS", "AllowedSessions"]

#: Remembered verdicts (distinct ``Cookie`` headers) per process; the oldest goes first.
MAX_VERDICTS = 4096

_time = time.time

# (headers for upstream, the L1 entry, until (Unix seconds), touch the L1 entry)
_Verdict = tuple[Mapping[str, str], L1Entry, float, Callable[[], None]]


class AllowedSessions:
    """The allowed verdicts, by raw ``Cookie`` header (see the module docstring)."""

    __slots__ = ("_entries", "_max", "_stats")

    def __init__(self, stats: EntitlementStats, max_entries: int = MAX_VERDICTS) -> None:
        self._entries: dict[str, _Verdict] = {}
        self._max = max_entries
        self._stats = stats

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cookie_header: str) -> Mapping[str, str] | None:
        """The ``X-Gate-*`` headers of a still-valid allowed verdict, or None."""
        verdict = self._entries.get(cookie_header)
        if verdict is None:
            return None
        headers, entry, until, touch = verdict
        if entry.live and _time() < until:
            touch()
            self._stats.l1_hits += 1
            return headers
        del self._entries[cookie_header]
        return None

    def put(
        self, cookie_header: str, headers: Mapping[str, str], hold: L1Hold, until: float
    ) -> Mapping[str, str]:
        """Remember an allowed verdict until ``until`` (Unix seconds; the L1 entry's own end
        is applied here). Returns the read-only headers that :meth:`get` will hand out."""
        until = min(until, hold.until)
        # Read-only, and the fastest source for the proxy's CIMultiDict.update.
        shared = CIMultiDictProxy(CIMultiDict(headers))
        if until <= _time() or not hold.entry.live:
            return shared
        entries = self._entries
        entries.pop(cookie_header, None)
        while len(entries) >= self._max:
            del entries[next(iter(entries))]
        entries[cookie_header] = (shared, hold.entry, until, hold.touch)
        return shared

    def clear(self) -> None:
        self._entries.clear()
