"""Currencies: which codes the stand-in accepts, Stripe's minimum charge per currency, and
how an amount in minor units reads to a person."""

import re

CURRENCY = re.compile(r"^[a-z]{3}$")

# Currencies without a minor unit: 100 JPY is sent as 100, not 10000.
ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv"}
    | {"xaf", "xof", "xpf"}
)

# Stripe's minimum charge amounts in minor units (docs.stripe.com/currencies); for the
# currencies not listed Stripe asks for about 0.50 USD, which 50 minor units approximates.
MINIMUM_CHARGE = {
    "usd": 50,
    "eur": 50,
    "gbp": 30,
    "aud": 50,
    "cad": 50,
    "chf": 50,
    "nzd": 50,
    "sgd": 50,
    "brl": 50,
    "inr": 50,
    "jpy": 50,
    "dkk": 250,
    "nok": 300,
    "sek": 300,
    "hkd": 400,
    "pln": 200,
    "ron": 200,
    "aed": 200,
    "myr": 200,
    "mxn": 1000,
    "thb": 1000,
    "czk": 1500,
    "huf": 17500,
}


def minimum_charge(currency: str) -> int:
    return MINIMUM_CHARGE.get(currency, 50)


def format_amount(amount: int, currency: str) -> str:
    """`150, "usd"` → `1.50 USD`; `500, "jpy"` → `500 JPY`."""
    if currency in ZERO_DECIMAL:
        return f"{amount} {currency.upper()}"
    return f"{amount // 100}.{amount % 100:02d} {currency.upper()}"
