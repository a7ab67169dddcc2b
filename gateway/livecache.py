"""The bounded in-process cache of the session and API-key caches (:mod:`gateway.sessions`,
:mod:`gateway.apikeys.keys`): least recently used entries go first, and an entry's ``live``
flag turns False the moment it leaves the cache (replaced, evicted, dropped, forgotten), so
the verdicts resting on it end with it. ``generation`` counts the forgets: a store read that
overlapped one must not be cached."""

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["LiveCache", "LiveEntry"]


class LiveEntry(Protocol):
    """What the cache keeps: anything with a ``live`` flag it may turn off."""

    live: bool


E = TypeVar("E", bound=LiveEntry)


class LiveCache(Generic[E]):
    """At most ``max_entries`` entries by key, least recently used first."""

    __slots__ = ("_entries", "_max", "generation")

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[str, E] = OrderedDict()
        self._max = max_entries
        #: Bumped by every :meth:`forget`.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> E | None:
        return self._entries.get(key)

    def used(self, key: str) -> None:
        """``key`` was just used: it is the last to be evicted."""
        self._entries.move_to_end(key)

    def put(self, key: str, entry: E) -> None:
        """Keep ``entry`` (ending the one it replaces), evicting the least recently used."""
        self.drop(key)
        self._entries[key] = entry
        while len(self._entries) > self._max:
            self.drop(next(iter(self._entries)))

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.live = False

    def forget(self, doomed: Callable[[E], bool]) -> None:
        """Drop every entry ``doomed`` picks (a revocation: rare, so a scan of the bounded
        cache is fine) and bump :attr:`generation`."""
        self.generation += 1
        for key in [k for k, e in self._entries.items() if doomed(e)]:
            self.drop(key)
