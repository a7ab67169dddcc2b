"""``plans.format_amount``: Stripe amounts in each currency's real minor unit."""

import pytest

from gateway.plans import format_amount


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (1900, "usd", "$19.00"),
        (1900, "USD", "$19.00"),
        (1234567, "gbp", "£12,345.67"),
        (999, "eur", "€9.99"),
        (5, "usd", "$0.05"),
        # zero-decimal currencies: the amount is whole units
        (1900, "jpy", "¥1,900"),
        (19000, "krw", "₩19,000"),
        (50000, "vnd", "₫50,000"),
        (1500, "clp", "CLP1,500"),
        (700, "ugx", "UGX700"),
        # three-decimal currencies: thousandths
        (1900, "kwd", "KWD1.900"),
        (None, "usd", "—"),
    ],
)
def test_format_amount(amount: int | None, currency: str, shown: str) -> None:
    assert format_amount(amount, currency) == shown
