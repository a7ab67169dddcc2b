"""Tiers: which paths need which entitlement feature, and which features a price carries (pure).

``FEATURE_RULES`` is a comma-separated list of ``PATTERN=FEATURE`` items, tried in order (the
first match wins), matched by :class:`gateway.path_rules.PathRules`: patterns as in
``PUBLIC_PATHS`` (``/export`` exactly, ``/api/analysis/*`` a prefix), but case-insensitively and
with or without a trailing slash (``/EXPORT`` and ``/export/`` need the feature of ``/export``,
as a lenient app routes them there), and an ambiguous raw path is matched as sent too — so no
spelling of a feature path gets through without the feature. A path no rule matches needs no
feature (any access, as without tiers).

``PRICE_FEATURES`` (``PRICE_ID=FEATURE|FEATURE`` items) names the features of a price, for
Stripe accounts that do not use Entitlements; they are added to those of the price's product
(see :func:`gateway.rules.feature_sources`). Feature names are Stripe ``lookup_key``s:
letters, digits and ``_ - . :``.
"""

import re
from collections.abc import Iterable, Mapping

from gateway.path_rules import PathRules
from gateway.setting_items import path_pattern, split_items

__all__ = ["FeatureRules", "parse_price_features"]

_FEATURE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,79}")
_PRICE = re.compile(r"[A-Za-z0-9_]{1,255}")
_NONE: frozenset[str] = frozenset()


class FeatureRules:
    """Parsed ``FEATURE_RULES`` (see the module docstring). Bad items raise :class:`ValueError`
    naming the item."""

    __slots__ = ("_rules", "features")

    def __init__(self, items: Iterable[str]) -> None:
        rules: list[tuple[str, str]] = []
        for item, pattern, sep, feature in split_items(items, at_last=True):
            if not sep or not pattern or not _FEATURE.fullmatch(feature):
                raise ValueError(f"{item!r}: expected /path=feature or /prefix/*=feature")
            rules.append((path_pattern(pattern, repr(item)), feature))
        self._rules = PathRules(rules)
        #: Every feature some rule names (an operator grant carries all of them).
        self.features: frozenset[str] = frozenset(self._rules.values)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def required(self, normalized_path: str, raw_path: str | None = None) -> str | None:
        """The feature the path needs, or None (remembered per raw path, bounded)."""
        return self._rules.match(normalized_path, raw_path)


def parse_price_features(items: Iterable[str]) -> Mapping[str, frozenset[str]]:
    """``PRICE_FEATURES`` items → {price id: features}; a bad item raises :class:`ValueError`.
    A price named twice gets the features of both items."""
    out: dict[str, frozenset[str]] = {}
    for item, price, sep, names in split_items(items):
        features = [n.strip() for n in names.split("|")]
        if not sep or not _PRICE.fullmatch(price) or not all(map(_FEATURE.fullmatch, features)):
            raise ValueError(f"{item!r}: expected price_id=feature|feature")
        out[price] = out.get(price, _NONE) | frozenset(features)
    return out
