"""Form decoding and validation: the SDK's `a[b][0][c]=v` bodies and query strings become
nested dicts, read field by field into typed requests; anything unexpected is refused the
way Stripe refuses it (`invalid_request_error` naming the `param`)."""

import operator
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import parse_qsl

from insertcoin.server.payments.standin.errors import ParamError
from insertcoin.server.payments.standin.money import CURRENCY, format_amount, minimum_charge

Node: TypeAlias = "str | dict[str, Node]"

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_LOCALE = re.compile(r"^(auto|[a-z]{2}(-[A-Z]{2})?)$")
_URL = re.compile(r"^https?://[^\s/]+\S*$")

# Delayed methods settle days later on Stripe; the hosted page offers them as "bank transfer".
DELAYED_METHODS = frozenset({"customer_balance", "us_bank_account", "sepa_debit"})
PAYMENT_METHOD_TYPES = ("card", "link", *sorted(DELAYED_METHODS))
MIN_SESSION_LIFE = 30 * 60
MAX_SESSION_LIFE = 24 * 3600


def decode_form(text: str) -> dict[str, Node]:
    """`line_items[0][quantity]=2&expand[]=x` → `{"line_items": {"0": {"quantity": "2"}},
    "expand": {"0": "x"}}`; lists stay digit-keyed dicts until a reader asks for a list."""
    root: dict[str, Node] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        match = _KEY.match(key)
        path = [match[1], *_SEGMENT.findall(match[2])] if match else [key]
        node = root
        for segment in path[:-1]:
            child = node.get(segment or str(len(node)))
            if not isinstance(child, dict):
                child = node[segment or str(len(node))] = {}
            node = child
        node[path[-1] or str(len(node))] = value
    return root


class Params:
    """One level of a decoded request, read field by field."""

    def __init__(self, data: dict[str, Node], prefix: str = "") -> None:
        self._data = data
        self._prefix = prefix

    def name(self, key: str) -> str:
        return f"{self._prefix}[{key}]" if self._prefix else key

    def only(self, *allowed: str) -> None:
        for key in self._data:
            if key not in allowed:
                raise ParamError(f"Received unknown parameter: {self.name(key)}", self.name(key))

    def _scalar(self, key: str, required: bool) -> str | None:
        value = self._data.get(key)
        name = self.name(key)
        if value is None:
            if required:
                raise ParamError(f"Missing required param: {name}.", name, "parameter_missing")
            return None
        if not isinstance(value, str):
            raise ParamError(f"Invalid {name}: expected a single value, not a hash.", name)
        if value == "":
            raise ParamError(
                f"You passed an empty string for '{name}'. We assume empty values are an "
                f"attempt to unset a parameter; however '{name}' cannot be unset. You should "
                f"remove '{name}' from your request or supply a non-empty value.",
                name,
            )
        return value

    def text(
        self,
        key: str,
        *,
        required: bool = False,
        max_length: int = 5000,
        choices: Collection[str] | None = None,
    ) -> str | None:
        value = self._scalar(key, required)
        name = self.name(key)
        if value is not None and len(value) > max_length:
            raise ParamError(
                f"Invalid {name}: must be at most {max_length} characters", name, "string_too_long"
            )
        if value is not None and choices is not None and value not in choices:
            raise ParamError(f"Invalid {name}: must be one of {', '.join(choices)}", name)
        return value

    def required_text(self, key: str, *, max_length: int = 5000) -> str:
        value = self.text(key, required=True, max_length=max_length)
        assert value is not None
        return value

    def integer(
        self,
        key: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        raw = self._scalar(key, required)
        if raw is None:
            return None
        name = self.name(key)
        if not re.fullmatch(r"-?\d+", raw):
            raise ParamError(f"Invalid integer: {raw}", name, "parameter_invalid_integer")
        value = int(raw)
        if minimum is not None and value < minimum:
            raise ParamError(f"This value must be greater than or equal to {minimum}.", name)
        if maximum is not None and value > maximum:
            raise ParamError(f"This value must be less than or equal to {maximum}.", name)
        return value

    def required_integer(self, key: str, *, minimum: int | None = None) -> int:
        value = self.integer(key, required=True, minimum=minimum)
        assert value is not None
        return value

    def boolean(self, key: str, *, required: bool = False) -> bool | None:
        raw = self._scalar(key, required)
        if raw is None:
            return None
        if raw not in ("true", "false"):
            raise ParamError(f"Invalid boolean: {raw}", self.name(key))
        return raw == "true"

    def hash(self, key: str, *, required: bool = False) -> "Params | None":
        value = self._data.get(key)
        name = self.name(key)
        if value is None or value == "":
            if required:
                raise ParamError(f"Missing required param: {name}.", name, "parameter_missing")
            return None
        if isinstance(value, str):
            raise ParamError(f"Invalid hash: {name} must be a hash, not a string.", name)
        return Params(value, name)

    def array(self, key: str) -> list[Node] | None:
        value = self._data.get(key)
        if value is None or value == "":
            return None
        name = self.name(key)
        if isinstance(value, str) or not all(index.isdigit() for index in value):
            raise ParamError(f"Invalid array: {name} must be an array.", name)
        return [value[index] for index in sorted(value, key=int)]

    def hashes(self, key: str) -> list["Params"]:
        items = self.array(key)
        if items is None:
            raise ParamError(
                f"Missing required param: {self.name(key)}.", self.name(key), "parameter_missing"
            )
        hashes = []
        for index, item in enumerate(items):
            name = f"{self.name(key)}[{index}]"
            if isinstance(item, str):
                raise ParamError(f"Invalid hash: {name} must be a hash.", name)
            hashes.append(Params(item, name))
        return hashes

    def texts(self, key: str, choices: Collection[str] | None = None) -> list[str] | None:
        items = self.array(key)
        if items is None:
            return None
        texts = []
        for index, item in enumerate(items):
            name = f"{self.name(key)}[{index}]"
            if not isinstance(item, str):
                raise ParamError(f"Invalid {name}: expected a string, not a hash.", name)
            if choices is not None and item not in choices:
                raise ParamError(f"Invalid {name}: must be one of {', '.join(choices)}", name)
            texts.append(item)
        return texts

    def metadata(self, key: str = "metadata") -> dict[str, str]:
        """Stripe's limits: at most 50 keys, keys up to 40 characters, values up to 500."""
        hash_ = self.hash(key)
        if hash_ is None:
            return {}
        if len(hash_._data) > 50:
            name = self.name(key)
            raise ParamError(f"Invalid {name}: at most 50 keys are allowed.", name)
        metadata = {}
        for name, value in hash_._data.items():
            param = hash_.name(name)
            if len(name) > 40:
                raise ParamError(
                    f"Metadata keys can have up to 40 characters; {name!r} is too long.", param
                )
            if not isinstance(value, str):
                raise ParamError(f"Invalid {param}: metadata values must be strings.", param)
            if len(value) > 500:
                raise ParamError(
                    f"Metadata values can have up to 500 characters; {param} is too long.", param
                )
            if value:  # an empty value unsets the key
                metadata[name] = value
        return metadata

    def expand(self, allowed: Collection[str]) -> list[str]:
        fields = self.array("expand") or []
        for index, field in enumerate(fields):
            if not isinstance(field, str) or field not in allowed:
                raise ParamError(f"This property cannot be expanded ({field}).", f"expand[{index}]")
        return [field for field in fields if isinstance(field, str)]


def _currency(params: Params, key: str) -> str:
    value = params.required_text(key)
    if not CURRENCY.match(value):
        raise ParamError(
            f"Invalid currency: {value}. Use a three-letter ISO code in lowercase, e.g. usd.",
            params.name(key),
        )
    return value


def _url(params: Params, key: str, *, required: bool) -> str | None:
    value = params.text(key, required=required)
    if value is not None and not _URL.match(value):
        raise ParamError("Not a valid URL", params.name(key), "url_invalid")
    return value


# Requests, validated ----------------------------------------------------------------------


@dataclass(frozen=True)
class Retrieval:
    expand: list[str]


@dataclass(frozen=True)
class CheckoutRequest:
    """The terms of a Checkout Session, as the caller created it."""

    product_name: str
    currency: str
    unit_amount: int
    quantity: int
    adjustable: tuple[int, int] | None  # (minimum, maximum) the customer may choose
    success_url: str
    cancel_url: str | None
    client_reference_id: str | None
    customer_email: str | None
    locale: str | None
    metadata: dict[str, str]
    payment_method_types: list[str] | None  # None: Stripe's dynamic choice (all of ours)
    manual_capture: bool
    intent_metadata: dict[str, str]
    intent_description: str | None
    expires_at: int | None
    expand: list[str]

    def accepts(self, method: str) -> bool:
        """`method`: "card" or "bank_transfer", as the hosted page offers them."""
        if self.payment_method_types is None:
            return True
        if method == "card":
            return "card" in self.payment_method_types
        return not DELAYED_METHODS.isdisjoint(self.payment_method_types)


@dataclass(frozen=True)
class Capture:
    amount_to_capture: int | None
    expand: list[str]


@dataclass(frozen=True)
class Cancel:
    cancellation_reason: str | None
    expand: list[str]


@dataclass(frozen=True)
class NewRefund:
    payment_intent: str
    amount: int | None
    reason: str | None
    metadata: dict[str, str]
    expand: list[str]


_COMPARE = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "eq": operator.eq,
}


@dataclass(frozen=True)
class Page:
    """A list request: `limit`, one cursor, `created` bounds."""

    limit: int
    starting_after: str | None
    ending_before: str | None
    created: list[tuple[str, int]]  # ("gte", 1700000000), ...

    def admits(self, created: int) -> bool:
        return all(_COMPARE[op](created, bound) for op, bound in self.created)


@dataclass(frozen=True)
class EventQuery:
    page: Page
    types: list[str] | None  # fnmatch patterns: Stripe's `type` allows a `*` wildcard


@dataclass(frozen=True)
class RefundQuery:
    page: Page
    payment_intent: str | None


SESSION_EXPANSIONS = ("payment_intent", "line_items")
INTENT_EXPANSIONS = ("latest_charge",)
REFUND_EXPANSIONS = ("charge", "payment_intent")


def retrieval(allowed: Collection[str]) -> Callable[[Params], Retrieval]:
    def parse(params: Params) -> Retrieval:
        params.only("expand")
        return Retrieval(params.expand(allowed))

    return parse


def checkout_session(params: Params, now: int) -> CheckoutRequest:
    params.only(
        "mode",
        "line_items",
        "success_url",
        "cancel_url",
        "client_reference_id",
        "metadata",
        "payment_intent_data",
        "payment_method_options",
        "payment_method_types",
        "expires_at",
        "customer_email",
        "locale",
        "expand",
    )
    params.text("mode", required=True, choices=("payment",))
    items = params.hashes("line_items")
    if len(items) != 1:
        raise ParamError("The stand-in supports exactly one line item.", "line_items")
    [item] = items
    item.only("price_data", "quantity", "adjustable_quantity")
    price = item.hash("price_data", required=True)
    assert price is not None
    price.only("currency", "unit_amount", "product_data")
    currency = _currency(price, "currency")
    unit_amount = price.required_integer("unit_amount", minimum=0)
    if unit_amount < minimum_charge(currency):
        raise ParamError(
            "The Checkout Session's total amount due must add up to at least "
            f"{format_amount(minimum_charge(currency), currency)}",
            price.name("unit_amount"),
            "amount_too_small",
        )
    product = price.hash("product_data", required=True)
    assert product is not None
    product.only("name")
    product_name = product.required_text("name", max_length=250)
    quantity = item.required_integer("quantity", minimum=1)
    adjustable = _adjustable(item, quantity)
    intent = params.hash("payment_intent_data") or Params({}, "payment_intent_data")
    intent.only("metadata", "capture_method", "description")
    options = params.hash("payment_method_options") or Params({}, "payment_method_options")
    options.only("card")
    card = options.hash("card") or Params({}, "payment_method_options[card]")
    card.only("capture_method")
    manual = intent.text("capture_method", choices=("automatic", "automatic_async", "manual"))
    card_manual = card.text("capture_method", choices=("manual",))
    expires_at = params.integer("expires_at")
    if expires_at is not None and expires_at < now + MIN_SESSION_LIFE:
        raise ParamError(
            "The `expires_at` timestamp must be at least 30 minutes from Checkout Session "
            "creation.",
            "expires_at",
        )
    if expires_at is not None and expires_at > now + MAX_SESSION_LIFE:
        raise ParamError(
            "The `expires_at` timestamp must be less than 24 hours from Checkout Session creation.",
            "expires_at",
        )
    email = params.text("customer_email", max_length=800)
    if email is not None and not _EMAIL.match(email):
        raise ParamError(f"Invalid email address: {email}", "customer_email", "email_invalid")
    locale = params.text("locale")
    if locale is not None and not _LOCALE.match(locale):
        raise ParamError(f"Invalid locale: {locale}", "locale")
    success_url = _url(params, "success_url", required=True)
    assert success_url is not None
    return CheckoutRequest(
        product_name=product_name,
        currency=currency,
        unit_amount=unit_amount,
        quantity=quantity,
        adjustable=adjustable,
        success_url=success_url,
        cancel_url=_url(params, "cancel_url", required=False),
        client_reference_id=params.text("client_reference_id", max_length=200),
        customer_email=email,
        locale=locale,
        metadata=params.metadata(),
        payment_method_types=params.texts("payment_method_types", PAYMENT_METHOD_TYPES),
        manual_capture="manual" in (manual, card_manual),
        intent_metadata=intent.metadata(),
        intent_description=intent.text("description", max_length=1000),
        expires_at=expires_at,
        expand=params.expand(SESSION_EXPANSIONS),
    )


def _adjustable(item: Params, quantity: int) -> tuple[int, int] | None:
    adjustable = item.hash("adjustable_quantity")
    if adjustable is None:
        return None
    adjustable.only("enabled", "minimum", "maximum")
    if not adjustable.boolean("enabled", required=True):
        return None
    minimum = adjustable.integer("minimum", minimum=0, maximum=999999)
    maximum = adjustable.integer("maximum", minimum=1, maximum=999999)
    bounds = (0 if minimum is None else minimum, 99 if maximum is None else maximum)
    if bounds[0] > bounds[1]:
        raise ParamError(
            "adjustable_quantity.minimum must be less than or equal to its maximum.",
            adjustable.name("minimum"),
        )
    if not bounds[0] <= quantity <= bounds[1]:
        raise ParamError(
            f"The quantity ({quantity}) must be between adjustable_quantity.minimum "
            f"({bounds[0]}) and adjustable_quantity.maximum ({bounds[1]}).",
            item.name("quantity"),
        )
    return bounds


def capture(params: Params) -> Capture:
    params.only("amount_to_capture", "expand")
    return Capture(params.integer("amount_to_capture", minimum=1), params.expand(INTENT_EXPANSIONS))


def cancel(params: Params) -> Cancel:
    params.only("cancellation_reason", "expand")
    reasons = ("duplicate", "fraudulent", "requested_by_customer", "abandoned")
    return Cancel(
        params.text("cancellation_reason", choices=reasons), params.expand(INTENT_EXPANSIONS)
    )


def refund(params: Params) -> NewRefund:
    params.only("payment_intent", "amount", "reason", "metadata", "expand")
    return NewRefund(
        payment_intent=params.required_text("payment_intent"),
        amount=params.integer("amount", minimum=1),
        reason=params.text("reason", choices=("duplicate", "fraudulent", "requested_by_customer")),
        metadata=params.metadata(),
        expand=params.expand(REFUND_EXPANSIONS),
    )


def _page(params: Params) -> Page:
    starting_after = params.text("starting_after")
    ending_before = params.text("ending_before")
    if starting_after and ending_before:
        raise ParamError(
            "You may only specify one of these parameters: ending_before, starting_after.",
            "ending_before",
        )
    created: list[tuple[str, int]] = []
    bounds = params.hash("created")
    if bounds is not None:
        bounds.only("gt", "gte", "lt", "lte")
        for op in ("gt", "gte", "lt", "lte"):
            value = bounds.integer(op)
            if value is not None:
                created.append((op, value))
    elif (exactly := params.integer("created")) is not None:
        created.append(("eq", exactly))
    limit = params.integer("limit", minimum=1, maximum=100)
    return Page(10 if limit is None else limit, starting_after, ending_before, created)


def events(params: Params) -> EventQuery:
    params.only("limit", "starting_after", "ending_before", "created", "type", "types")
    single = params.text("type")
    many = params.texts("types")
    if single is not None and many is not None:
        raise ParamError("You may pass either type or types, but not both.", "types")
    if many is not None and len(many) > 20:
        raise ParamError("Invalid types: an array of at most 20 event types.", "types")
    types = [single] if single is not None else many
    return EventQuery(_page(params), types)


def refunds(params: Params) -> RefundQuery:
    params.only("limit", "starting_after", "ending_before", "created", "payment_intent")
    return RefundQuery(_page(params), params.text("payment_intent"))
