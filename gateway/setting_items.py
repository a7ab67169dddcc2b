"""The ``KEY=VALUE`` items of a list setting, split once for every parser of them (pure).

``FEATURE_RULES``, ``PRICE_FEATURES``, ``CHECKOUT_METERED_PRICES``, ``USAGE_RULES`` and
``PRICE_QUOTAS`` are lists of such items. :func:`split_items` skips the blank ones and splits
the others as :meth:`str.partition` does, both sides stripped; each parser checks the sides and
words its own errors. :func:`path_pattern` checks a pattern as ``PUBLIC_PATHS`` does, with the
same messages, naming the item it came from.
"""

from collections.abc import Iterable, Iterator
from typing import NamedTuple

from gateway.paths import PublicPaths

__all__ = ["SettingItem", "path_pattern", "split_items"]


class SettingItem(NamedTuple):
    """One item: as written (stripped), the key, ``"="`` (or ``""`` without one), the value."""

    item: str
    key: str
    sep: str
    value: str


def split_items(items: Iterable[str], *, at_last: bool = False) -> Iterator[SettingItem]:
    """The non-blank ``items``, split at their first ``=`` (``at_last``: at their last one, for
    a key that may hold one, as a path pattern may), key and value stripped."""
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.rpartition("=") if at_last else item.partition("=")
        yield SettingItem(item, key.strip(), sep, value.strip())


def path_pattern(pattern: str, where: str) -> str:
    """``pattern`` when it is one as in ``PUBLIC_PATHS`` (``/exact`` or ``/prefix/*``), else
    :class:`ValueError` ``"{where}: {why}"``."""
    try:
        PublicPaths([pattern])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return pattern
