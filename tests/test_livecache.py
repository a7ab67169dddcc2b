"""gateway.livecache: the bounded cache of the session and API-key caches — an entry's ``live``
ends whenever it leaves (replaced, evicted, dropped, forgotten); forgets bump the generation."""

from dataclasses import dataclass

from gateway.livecache import LiveCache


@dataclass
class Entry:
    name: str
    live: bool = True


def test_a_replaced_entry_is_no_longer_live() -> None:
    cache: LiveCache[Entry] = LiveCache(4)
    old, new = Entry("old"), Entry("new")
    cache.put("k", old)
    cache.put("k", new)
    assert cache.get("k") is new and new.live
    assert not old.live
    assert len(cache) == 1


def test_the_least_recently_used_entry_is_evicted_and_ends() -> None:
    cache: LiveCache[Entry] = LiveCache(2)
    a, b, c = Entry("a"), Entry("b"), Entry("c")
    cache.put("a", a)
    cache.put("b", b)
    cache.used("a")  # b is now the least recently used
    cache.put("c", c)
    assert cache.get("b") is None and not b.live
    assert cache.get("a") is a and a.live
    assert cache.get("c") is c and c.live
    assert len(cache) == 2


def test_drop_ends_the_entry_and_ignores_a_missing_key() -> None:
    cache: LiveCache[Entry] = LiveCache(2)
    a = Entry("a")
    cache.put("a", a)
    cache.drop("a")
    cache.drop("nothing")
    assert cache.get("a") is None and not a.live
    assert len(cache) == 0


def test_forget_drops_what_it_picks_and_bumps_the_generation() -> None:
    cache: LiveCache[Entry] = LiveCache(8)
    entries = {name: Entry(name) for name in ("x1", "x2", "y1")}
    for name, entry in entries.items():
        cache.put(name, entry)
    assert cache.generation == 0
    cache.forget(lambda e: e.name.startswith("x"))
    assert cache.generation == 1
    assert [n for n, e in entries.items() if e.live] == ["y1"]
    assert cache.get("y1") is entries["y1"] and len(cache) == 1
    cache.forget(lambda e: False)  # nothing picked: still a forget
    assert cache.generation == 2 and entries["y1"].live
