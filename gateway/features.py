"""Tiers: which paths need which entitlement feature, and which features a price carries (pure).

``FEATURE_RULES`` is a comma-separated list of ``PATTERN=FEATURE`` items, tried in order (the
first match wins). Patterns are those of ``PUBLIC_PATHS`` (:class:`gateway.paths.PublicPaths`):
``/export`` exactly, ``/api/analysis/*`` a prefix. They match the *normalized* path; when the
raw path is ambiguous (``%2F``, dot segments: an upstream may route it elsewhere than we
normalize it, see :mod:`gateway.paths`), the raw form is matched too, and the first rule that
matches either form applies — so no spelling of a feature path gets through without the feature.
A path no rule matches needs no feature (any access, as without tiers).

``PRICE_FEATURES`` (``PRICE_ID=FEATURE|FEATURE`` items) names the features of a price, for
Stripe accounts that do not use Entitlements; they are added to the customer's active
entitlements. Feature names are Stripe ``lookup_key``s: letters, digits and ``_ - . :``.
"""

import re
from collections.abc import Iterable, Mapping

from gateway.paths import PublicPaths, is_unambiguous, normalize_path

__all__ = ["FeatureRules", "parse_price_features"]

_FEATURE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,79}")
_PRICE = re.compile(r"[A-Za-z0-9_]{1,255}")
#: Distinct raw paths remembered by :meth:`FeatureRules.required` (then it starts over).
MEMO_PATHS = 4096
MAX_MEMO_PATH = 512
_NONE: frozenset[str] = frozenset()


class FeatureRules:
    """Parsed ``FEATURE_RULES`` (see the module docstring). Bad items raise :class:`ValueError`
    naming the item."""

    __slots__ = ("_memo", "_rules", "features")

    def __init__(self, items: Iterable[str]) -> None:
        rules: list[tuple[str, bool, str]] = []
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            pattern, sep, feature = item.rpartition("=")
            pattern, feature = pattern.strip(), feature.strip()
            if not sep or not pattern or not _FEATURE.fullmatch(feature):
                raise ValueError(f"{item!r}: expected /path=feature or /prefix/*=feature")
            try:
                PublicPaths([pattern])  # the same pattern rules, the same messages
            except ValueError as exc:
                raise ValueError(f"{item!r}: {exc}") from None
            star = pattern.endswith("*")
            body = normalize_path(pattern[:-1] if star else pattern)
            assert body is not None  # checked by PublicPaths
            rules.append((body, star, feature))
        self._rules = tuple(rules)
        #: Every feature some rule names (an operator grant carries all of them).
        self.features: frozenset[str] = frozenset(f for _, _, f in rules)
        self._memo: dict[str, str | None] = {}

    def __bool__(self) -> bool:
        return bool(self._rules)

    def _match(self, path: str) -> str | None:
        for body, star, feature in self._rules:
            if path.startswith(body) if star else path == body:
                return feature
        return None

    def required(self, normalized_path: str, raw_path: str | None = None) -> str | None:
        """The feature the path needs, or None (remembered per raw path, bounded)."""
        key = normalized_path if raw_path is None else raw_path.partition("?")[0]
        try:
            return self._memo[key]
        except KeyError:
            pass
        feature = self._match(normalized_path)
        if feature is None and raw_path is not None and not is_unambiguous(key):
            feature = self._match(key)
        if len(key) <= MAX_MEMO_PATH:
            if len(self._memo) >= MEMO_PATHS:
                self._memo.clear()
            self._memo[key] = feature
        return feature


def parse_price_features(items: Iterable[str]) -> Mapping[str, frozenset[str]]:
    """``PRICE_FEATURES`` items → {price id: features}; a bad item raises :class:`ValueError`.
    A price named twice gets the features of both items."""
    out: dict[str, frozenset[str]] = {}
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        price, sep, names = item.partition("=")
        price = price.strip()
        features = [n.strip() for n in names.split("|")]
        if not sep or not _PRICE.fullmatch(price) or not all(map(_FEATURE.fullmatch, features)):
            raise ValueError(f"{item!r}: expected price_id=feature|feature")
        out[price] = out.get(price, _NONE) | frozenset(features)
    return out
