"""Prices: what an operator types, what is stored (minor units), what is shown."""

import pytest

from insertcoin.server.cabinets.models import CabinetPrice, amount_from_decimal, format_amount


@pytest.mark.parametrize(
    ("typed", "currency", "stored", "shown"),
    [
        ("1.00", "usd", 100, "1.00 USD"),
        ("0.05", "EUR", 5, "0.05 EUR"),
        ("2.5", "gbp", 250, "2.50 GBP"),
        ("500", "jpy", 500, "500 JPY"),
        ("0", "usd", 0, "0.00 USD"),
    ],
)
def test_prices_round_trip_through_minor_units(typed, currency, stored, shown):
    """A typed price becomes minor units (cents, or whole yen for zero-decimal
    currencies) and is shown back the way it was meant."""
    amount = amount_from_decimal(typed, currency)
    assert amount == stored
    assert format_amount(CabinetPrice(amount=amount, currency=currency.lower())) == shown


@pytest.mark.parametrize("typed", ["1.001", "-1", "abc", "1.5e400", "NaN", "100000000"])
def test_prices_that_cannot_be_charged_are_refused(typed):
    """Fractions of a cent, negatives, non-numbers and amounts over Stripe's ceiling
    are refused with a reason naming the price."""
    with pytest.raises(ValueError, match="price"):
        amount_from_decimal(typed, "usd")
