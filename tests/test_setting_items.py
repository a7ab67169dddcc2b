"""gateway.setting_items: the ``KEY=VALUE`` items of the list settings, split and checked once
for every parser (``FEATURE_RULES``, ``PRICE_FEATURES``, ``CHECKOUT_METERED_PRICES``,
``USAGE_RULES``, ``PRICE_QUOTAS``), and the messages those parsers give for a bad item."""

from collections.abc import Callable

import pytest

from gateway.features import FeatureRules, parse_price_features
from gateway.setting_items import SettingItem, path_pattern, split_items
from gateway.usage.config import parse_usage


def test_blank_items_are_skipped_and_both_sides_stripped() -> None:
    assert list(split_items([" a = b ", "", "  ", "c=d=e"])) == [
        SettingItem("a = b", "a", "=", "b"),
        SettingItem("c=d=e", "c", "=", "d=e"),
    ]


def test_at_last_splits_at_the_last_equals_sign() -> None:
    assert list(split_items(["/a=b=c", " GET /x = m "], at_last=True)) == [
        SettingItem("/a=b=c", "/a=b", "=", "c"),
        SettingItem("GET /x = m", "GET /x", "=", "m"),
    ]


def test_an_item_without_equals_sign_has_no_separator() -> None:
    (first,) = split_items(["price_a"])
    (last,) = split_items(["price_a"], at_last=True)
    assert first.sep == last.sep == ""
    assert first.item == last.item == "price_a"


def test_path_pattern_keeps_a_good_pattern_and_names_the_item_of_a_bad_one() -> None:
    assert path_pattern("/api/*", "x") == "/api/*"
    with pytest.raises(ValueError, match=r"^'api/\*=m': public path 'api/\*'"):
        path_pattern("api/*", "'api/*=m'")


@pytest.mark.parametrize(
    ("parse", "message"),
    [
        (lambda: FeatureRules(["/ok=a", "api/*=b"]), r"^'api/\*=b': public path 'api/\*'"),
        (lambda: FeatureRules(["/x"]), r"^'/x': expected /path=feature"),
        (lambda: parse_price_features(["price a=x"]), r"^'price a=x': expected price_id="),
        (
            lambda: parse_usage(["POST api/*=m"], [], [], []),
            r"^USAGE_RULES item 'POST api/\*=m': public path 'api/\*'",
        ),
        (
            lambda: parse_usage(["/x=m"], [], ["price_a"], []),
            r"^PRICE_QUOTAS item 'price_a': expected price_id=meter:N",
        ),
    ],
)
def test_each_parser_names_the_bad_item(parse: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse()


def test_usage_rules_split_method_pattern_and_meter() -> None:
    config = parse_usage([" post /api/*=analysis ", "/ws = live"], [], ["price_a = analysis:3"], [])
    assert config.meter_for("POST", "/api/run", None) == "analysis"
    assert config.meter_for("GET", "/api/run", None) is None
    assert config.meter_for("GET", "/ws", None) == "live"
    assert dict(config.price_quotas["price_a"]) == {"analysis": 3}
