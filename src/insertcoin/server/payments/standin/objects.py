"""The Stripe objects the stand-in keeps (Checkout Sessions, PaymentIntents, charges,
refunds, events), their ids, and their JSON as Stripe's API returns it."""

import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from insertcoin.server.payments.standin.params import CheckoutRequest

Json = dict[str, Any]

# Events carry the API version of the SDK this stand-in is tested with.
API_VERSION = "2026-10-28.endive"

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class Origin:
    """The API request behind an event; automatic events (payments, expiry) have none."""

    request_id: str | None = None
    idempotency_key: str | None = None


@dataclass
class Session:
    id: str
    url: str
    created: int
    expires_at: int
    terms: CheckoutRequest
    quantity: int
    status: str = "open"
    payment_status: str = "unpaid"
    # The PaymentIntent of the latest attempt: a declined card's attempt is reused by the
    # next one, and the session shows it only once paid, as Stripe does.
    intent_id: str | None = None
    settle_at: float | None = None
    settle_succeeds: bool = True
    line_item_id: str = field(default_factory=lambda: new_id("li_"))
    price_id: str = field(default_factory=lambda: new_id("price_"))
    product_id: str = field(default_factory=lambda: new_id("prod_"))

    @property
    def amount_total(self) -> int:
        return self.terms.unit_amount * self.quantity

    def to_json(self) -> Json:
        terms = self.terms
        return {
            "id": self.id,
            "object": "checkout.session",
            "amount_subtotal": self.amount_total,
            "amount_total": self.amount_total,
            "cancel_url": terms.cancel_url,
            "client_reference_id": terms.client_reference_id,
            "created": self.created,
            "currency": terms.currency,
            "customer_email": terms.customer_email,
            "expires_at": self.expires_at,
            "livemode": False,
            "locale": terms.locale,
            "metadata": dict(terms.metadata),
            "mode": "payment",
            "payment_intent": self.intent_id if self.status == "complete" else None,
            "payment_method_types": list(
                terms.payment_method_types or ["card", "customer_balance"]
            ),
            "payment_status": self.payment_status,
            "status": self.status,
            "success_url": terms.success_url,
            "url": self.url if self.status == "open" else None,
        }

    def line_items_json(self) -> Json:
        terms = self.terms
        item = {
            "id": self.line_item_id,
            "object": "item",
            "amount_subtotal": self.amount_total,
            "amount_total": self.amount_total,
            "currency": terms.currency,
            "description": terms.product_name,
            "quantity": self.quantity,
            "price": {
                "id": self.price_id,
                "object": "price",
                "currency": terms.currency,
                "livemode": False,
                "product": self.product_id,
                "type": "one_time",
                "unit_amount": terms.unit_amount,
            },
        }
        return {
            "object": "list",
            "data": [item],
            "has_more": False,
            "url": f"/v1/checkout/sessions/{self.id}/line_items",
        }


@dataclass
class PaymentIntent:
    amount: int
    currency: str
    capture_method: str
    payment_method_type: str
    metadata: dict[str, str]
    description: str | None
    created: int
    id: str = field(default_factory=lambda: new_id("pi_"))
    status: str = "requires_payment_method"
    amount_capturable: int = 0
    amount_received: int = 0
    latest_charge: str | None = None
    last_payment_error: Json | None = None
    canceled_at: int | None = None
    cancellation_reason: str | None = None

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "amount_capturable": self.amount_capturable,
            "amount_received": self.amount_received,
            "canceled_at": self.canceled_at,
            "cancellation_reason": self.cancellation_reason,
            "capture_method": self.capture_method,
            "created": self.created,
            "currency": self.currency,
            "description": self.description,
            "last_payment_error": self.last_payment_error,
            "latest_charge": self.latest_charge,
            "livemode": False,
            "metadata": dict(self.metadata),
            "payment_method_types": [self.payment_method_type],
            "status": self.status,
        }


@dataclass
class Charge:
    amount: int
    currency: str
    payment_intent: str
    created: int
    amount_captured: int
    id: str = field(default_factory=lambda: new_id("ch_"))
    amount_refunded: int = 0

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "object": "charge",
            "amount": self.amount,
            "amount_captured": self.amount_captured,
            "amount_refunded": self.amount_refunded,
            "captured": self.amount_captured > 0,
            "created": self.created,
            "currency": self.currency,
            "livemode": False,
            "paid": True,
            "payment_intent": self.payment_intent,
            "refunded": self.amount_captured > 0 and self.amount_refunded == self.amount_captured,
            "status": "succeeded",
        }


@dataclass
class Refund:
    amount: int
    currency: str
    payment_intent: str
    charge: str
    reason: str | None
    metadata: dict[str, str]
    created: int
    id: str = field(default_factory=lambda: new_id("re_"))

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "object": "refund",
            "amount": self.amount,
            "charge": self.charge,
            "created": self.created,
            "currency": self.currency,
            "metadata": dict(self.metadata),
            "payment_intent": self.payment_intent,
            "reason": self.reason,
            "status": "succeeded",
        }


@dataclass
class Event:
    type: str
    snapshot: Json  # `data.object` as it was when the event happened
    created: int
    origin: Origin
    seq: int  # creation order: many events share one `created` second
    id: str = field(default_factory=lambda: new_id("evt_"))
    pending_webhooks: int = 0

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "object": "event",
            "api_version": API_VERSION,
            "created": self.created,
            "data": {"object": self.snapshot},
            "livemode": False,
            "pending_webhooks": self.pending_webhooks,
            "request": {
                "id": self.origin.request_id,
                "idempotency_key": self.origin.idempotency_key,
            },
            "type": self.type,
        }
