"""Cabinet shapes of the operator API and `cabinet add --json` (PROTOCOL.md sections 4, 6)."""

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from insertcoin.protocol.ids import MACHINE_ID_PATTERN, TEXT_PATTERN
from insertcoin.protocol.messages import MAX_CREDITS_PER_PURCHASE, MAX_PRICE_AMOUNT, Price

# Stripe's zero-decimal currencies: amounts are whole units, not cents.
_ZERO_DECIMAL = frozenset(
    [
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    ]
)


def amount_from_decimal(price: str, currency: str) -> int:
    """'1.00' usd → 100; '500' jpy → 500. Raises ValueError with a reason."""
    invalid = ValueError(f"price {price!r} is not a valid {currency.upper()} amount (e.g. 1.00)")
    try:
        value = Decimal(price)
        if not value.is_finite():
            raise invalid
        amount = value.scaleb(_exponent(currency))
        if amount != amount.to_integral_value() or not 0 <= amount <= MAX_PRICE_AMOUNT:
            raise invalid
    except ArithmeticError:  # not a number at all, or too large to scale
        raise invalid from None
    return int(amount)


def format_amount(price: "CabinetPrice") -> str:
    """100 usd → '1.00 USD'; 500 jpy → '500 JPY'."""
    exponent = _exponent(price.currency)
    return f"{Decimal(price.amount).scaleb(-exponent):.{exponent}f} {price.currency.upper()}"


def _exponent(currency: str) -> int:
    return 0 if currency.lower() in _ZERO_DECIMAL else 2


class _Model(BaseModel):
    # strict: `"creditsPerPurchase": "2"` or `"enabled": 0` is a mistake, not a value.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )


CabinetName = Annotated[str, Field(min_length=1, max_length=200, pattern=TEXT_PATTERN)]
CreditsPerPurchase = Annotated[int, Field(ge=1, le=MAX_CREDITS_PER_PURCHASE)]
# Checkout's adjustable quantity goes up to 99.
MaxQuantity = Annotated[int, Field(ge=1, le=99)]


class PriceIn(_Model):
    model_config = ConfigDict(strict=True, extra="forbid")

    amount: Annotated[int, Field(ge=0, le=MAX_PRICE_AMOUNT)]
    currency: Annotated[str, Field(pattern=r"^[a-zA-Z]{3}$")]

    def to_price(self) -> Price:
        return Price(amount=self.amount, currency=self.currency.lower())


class CabinetPrice(_Model):
    """A cabinet's price as the operator API shows it (the wire's `Price`, in pydantic)."""

    amount: int
    currency: str


class CabinetCreate(_Model):
    machine_id: Annotated[str, Field(pattern=MACHINE_ID_PATTERN)]
    name: CabinetName
    price: PriceIn
    credits_per_purchase: CreditsPerPurchase = 1
    max_quantity: MaxQuantity = 10


class CabinetPatch(_Model):
    name: CabinetName | None = None
    price: PriceIn | None = None
    credits_per_purchase: CreditsPerPurchase | None = None
    max_quantity: MaxQuantity | None = None
    enabled: bool | None = None


class MqttCredentials(_Model):
    username: str
    password: str


class Cabinet(_Model):
    machine_id: str
    name: str
    enabled: bool
    price: CabinetPrice
    credits_per_purchase: int
    max_quantity: int
    pay_url: str
    online: bool
    state: str | None
    credits: int | None
    last_seen: datetime | None


class NewCabinet(Cabinet):
    """Returned once, at creation: the only time the secrets are shown."""

    mqtt: MqttCredentials
    token: str
