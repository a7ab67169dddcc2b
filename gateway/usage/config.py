"""Usage settings parsed (pure): which requests count on which meter, and how many units each
price (or no subscription) includes per period.

- ``USAGE_RULES``: ``[METHOD ]PATTERN=METER`` items; patterns as in ``FEATURE_RULES``
  (:class:`gateway.path_rules.PathRules`: case-insensitive, with or without a trailing slash,
  first match wins); an optional method (``POST /api/analyze*=analysis``) limits the rule to it.
- ``USAGE_METERS``: more meter names the app may report (``X-Gate-Usage``, ``POST /_gate/usage``)
  without a path rule.
- ``PRICE_QUOTAS``: ``PRICE_ID=METER:N|METER:N`` items (units included per billing period).
- ``FREE_QUOTAS``: ``METER:N|…`` (units per calendar month, UTC, for signed-in customers
  without a subscription).

A meter name is a Stripe meter's ``event_name``.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.path_rules import PathRules
from gateway.setting_items import path_pattern, split_items

__all__ = ["METER_NAME", "UsageConfig", "parse_quota_list", "parse_usage"]

#: Stripe's event_name: letters, digits and ``_ - .`` (at most 100 characters).
METER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_METHOD = re.compile(r"[A-Z]{1,16}")
_PRICE = re.compile(r"[A-Za-z0-9_]{1,255}")
_ANY = "*"


def parse_quota_list(text: str, item: str) -> dict[str, int]:
    """``METER:N|METER:N`` → {meter: N}; :class:`ValueError` naming ``item``."""
    out: dict[str, int] = {}
    for part in text.split("|"):
        meter, sep, number = part.strip().partition(":")
        meter, number = meter.strip(), number.strip()
        if not sep or not METER_NAME.fullmatch(meter) or not number.isdigit():
            raise ValueError(f"{item!r}: expected meter:N (N a whole number ≥ 0), '|'-separated")
        out[meter] = int(number)
    return out


@dataclass(frozen=True)
class UsageConfig:
    """The usage settings, parsed. ``rules`` map a path to ``{method or "*": meter}``."""

    rules: PathRules[Mapping[str, str]]
    meters: frozenset[str]
    price_quotas: Mapping[str, Mapping[str, int]]
    free_quotas: Mapping[str, int]

    def __bool__(self) -> bool:
        return bool(self.meters)

    def meter_for(self, method: str, normalized_path: str, raw_path: str | None) -> str | None:
        """The meter a request counts on, or None (remembered per raw path, bounded)."""
        by_method = self.rules.match(normalized_path, raw_path)
        if by_method is None:
            return None
        head = by_method.get("GET") if method == "HEAD" else None  # HEAD runs the GET handler
        return by_method.get(method) or head or by_method.get(_ANY)

    def unlimited(self, price_ids: Iterable[str]) -> list[tuple[str, str]]:
        """(price, meter) pairs where a sold price has no quota on a meter other prices of
        ``PRICE_QUOTAS`` limit: that price is unlimited there (likely a forgotten entry)."""
        limited = {m for q in self.price_quotas.values() for m in q}
        return [
            (price, meter)
            for price in price_ids
            for meter in sorted(limited)
            if meter not in self.price_quotas.get(price, {})
        ]

    def quota(self, price_id: str | None, meter: str) -> int | None:
        """Units the price includes per period on ``meter`` (None: no quota, only counted)."""
        if price_id is None:
            return None
        return self.price_quotas.get(price_id, {}).get(meter)


def parse_usage(
    rules: Iterable[str],
    meters: Iterable[str],
    price_quotas: Iterable[str],
    free_quotas: Iterable[str],
) -> UsageConfig:
    """The usage settings from their raw items; :class:`ValueError` starting with the
    setting's name on a bad item."""
    by_pattern: dict[str, dict[str, str]] = {}
    order: list[str] = []
    for item, head, sep, meter in split_items(rules, at_last=True):
        method, _, pattern = head.rpartition(" ")
        method, pattern = method.strip().upper() or _ANY, pattern.strip()
        if (
            not sep
            or not pattern
            or not METER_NAME.fullmatch(meter)
            or (method != _ANY and not _METHOD.fullmatch(method))
        ):
            raise ValueError(
                f"USAGE_RULES item {item!r}: expected [METHOD ]/path=meter or /prefix/*=meter"
            )
        path_pattern(pattern, f"USAGE_RULES item {item!r}")
        if pattern not in by_pattern:
            by_pattern[pattern] = {}
            order.append(pattern)
        by_pattern[pattern].setdefault(method, meter)
    table: PathRules[Mapping[str, str]] = PathRules(
        (p, MappingProxyType(by_pattern[p])) for p in order
    )
    known = {m for p in by_pattern.values() for m in p.values()}
    for raw in meters:
        name = raw.strip()
        if name and not METER_NAME.fullmatch(name):
            raise ValueError(f"USAGE_METERS item {name!r}: expected a meter event name")
        if name:
            known.add(name)
    quotas: dict[str, Mapping[str, int]] = {}
    for item, price, sep, rest in split_items(price_quotas):
        if not sep or not _PRICE.fullmatch(price):
            raise ValueError(f"PRICE_QUOTAS item {item!r}: expected price_id=meter:N|meter:N")
        try:
            parsed = parse_quota_list(rest, item)
        except ValueError as exc:
            raise ValueError(f"PRICE_QUOTAS item {exc}") from None
        _known(parsed, known, "PRICE_QUOTAS", item)
        quotas[price] = MappingProxyType({**quotas.get(price, {}), **parsed})
    free: dict[str, int] = {}
    text = "|".join(p.strip() for p in free_quotas if p.strip())
    if text:
        try:
            free = parse_quota_list(text, text)
        except ValueError as exc:
            raise ValueError(f"FREE_QUOTAS item {exc}") from None
        _known(free, known, "FREE_QUOTAS", text)
    return UsageConfig(
        rules=table,
        meters=frozenset(known),
        price_quotas=MappingProxyType(quotas),
        free_quotas=MappingProxyType(free),
    )


def _known(quotas: Mapping[str, int], known: set[str], name: str, item: str) -> None:
    for meter in quotas:
        if meter not in known:
            raise ValueError(
                f"{name} item {item!r}: meter {meter!r} is not named in USAGE_RULES or USAGE_METERS"
            )
