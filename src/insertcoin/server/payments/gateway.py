"""Every call to Stripe, through the official SDK (`StripeClient`), in one place.

Calls that change money carry an idempotency key the caller derives from what the call
acts on, so a retry after a timeout cannot act twice. Errors come out as two kinds:
`StripeUnavailable` (5xx, 429 or no answer: the outcome is unknown, re-read before
retrying) and `StripeRefused` (Stripe answered no; retrying the same call won't help).

Loading the SDK costs about 0.08 s, so it happens on first use (or in `warm_up`, off the
start-up path), never when this module is imported.
"""

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import orjson

from insertcoin.server.errors import InsertcoinError

if TYPE_CHECKING:
    import stripe

T = TypeVar("T")

# Webhooks older than this are refused (Stripe's own default tolerance).
SIGNATURE_TOLERANCE_SECONDS = 300


class StripeUnavailable(InsertcoinError):
    """No usable answer (network error, 5xx, rate limited): the call may or may not have
    acted. `status` is None when no answer came at all."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class StripeRefused(InsertcoinError):
    """Stripe answered with a 4xx: `code` is Stripe's error code (may be None)."""

    def __init__(self, message: str, status: int | None, code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class BadSignature(InsertcoinError):
    """A webhook whose `Stripe-Signature` does not verify, or is too old."""


@dataclass(frozen=True)
class PaymentIntent:
    id: str
    status: str
    amount: int
    amount_received: int
    currency: str
    capture_method: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class CheckoutSession:
    id: str
    status: str  # open | complete | expired
    payment_status: str  # paid | unpaid | no_payment_required
    machine_id: str | None  # metadata.machine_id
    client_reference_id: str | None
    currency: str | None
    amount_total: int | None
    quantity: int  # summed over line items
    unit_amounts: tuple[int, ...]  # each line item's price.unit_amount
    payment_intent: PaymentIntent | None
    url: str | None


def _pi(data: dict[str, Any]) -> PaymentIntent:
    return PaymentIntent(
        id=data["id"],
        status=data["status"],
        amount=int(data.get("amount") or 0),
        amount_received=int(data.get("amount_received") or 0),
        currency=str(data.get("currency") or ""),
        capture_method=str(data.get("capture_method") or "automatic"),
        metadata=dict(data.get("metadata") or {}),
    )


def _session(data: dict[str, Any]) -> CheckoutSession:
    items = (data.get("line_items") or {}).get("data") or []
    intent = data.get("payment_intent")
    return CheckoutSession(
        id=data["id"],
        status=str(data.get("status")),
        payment_status=str(data.get("payment_status")),
        machine_id=(data.get("metadata") or {}).get("machine_id"),
        client_reference_id=data.get("client_reference_id"),
        currency=data.get("currency"),
        amount_total=data.get("amount_total"),
        quantity=sum(int(item.get("quantity") or 0) for item in items),
        unit_amounts=tuple(
            int((item.get("price") or {}).get("unit_amount") or 0) for item in items
        ),
        payment_intent=_pi(intent) if isinstance(intent, dict) else None,
        url=data.get("url"),
    )


class StripeGateway:
    def __init__(self, api_key: str, *, api_base: str | None = None, timeout: float = 20.0) -> None:
        self._api_key = api_key
        self._api_base = api_base
        self._timeout = timeout
        self._client: stripe.StripeClient | None = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Import the SDK and build the client now (call it off the request path)."""
        self._sdk()

    def _sdk(self) -> "stripe.StripeClient":
        with self._lock:
            if self._client is None:
                # 0.08 s: kept off the start-up path
                from insertcoin.server.payments import stripe_http  # noqa: PLC0415

                self._client = stripe_http.new_client(self._api_key, self._api_base, self._timeout)
            return self._client

    def _call(self, action: str, call: Callable[["stripe.StripeClient"], T]) -> T:
        client = self._sdk()
        import stripe  # noqa: PLC0415 - already loaded by _sdk

        try:
            return call(client)
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            raise StripeUnavailable(
                f"{action}: {exc.user_message or exc}", exc.http_status
            ) from None
        except stripe.StripeError as exc:
            status = exc.http_status
            message = f"{action}: {exc.user_message or exc}"
            if status is None or status >= 500:
                raise StripeUnavailable(message, status) from None
            raise StripeRefused(message, status, exc.code) from None

    def _request(
        self, action: str, method: str, path: str, key: str | None = None, **params: Any
    ) -> dict[str, Any]:
        """One API call through the SDK's requestor (auth, version, idempotency, Stripe's
        errors), read as plain JSON: building typed StripeObjects would cost a third of
        the call's CPU, and every caller here wants a few fields."""
        if key is not None:
            params["idempotency_key"] = key
        response = self._call(action, lambda c: c.raw_request(method, path, **params))
        body: dict[str, Any] = orjson.loads(response.body)
        return body

    # Checkout ------------------------------------------------------------------------

    def create_checkout_session(
        self, params: dict[str, Any], *, idempotency_key: str
    ) -> CheckoutSession:
        created = self._request(
            "create checkout session", "post", "/v1/checkout/sessions", idempotency_key, **params
        )
        return _session(created)

    def retrieve_session(self, session_id: str) -> CheckoutSession:
        found = self._request(
            "retrieve checkout session",
            "get",
            f"/v1/checkout/sessions/{quote(session_id, safe='')}",
            expand=["payment_intent", "line_items"],
        )
        return _session(found)

    # Money ---------------------------------------------------------------------------

    def _intent(self, intent_id: str) -> str:
        return f"/v1/payment_intents/{quote(intent_id, safe='')}"

    def retrieve_payment_intent(self, intent_id: str) -> PaymentIntent:
        return _pi(self._request("retrieve payment intent", "get", self._intent(intent_id)))

    def capture(self, intent_id: str, *, idempotency_key: str) -> PaymentIntent:
        path = self._intent(intent_id) + "/capture"
        return _pi(self._request("capture", "post", path, idempotency_key))

    def cancel(self, intent_id: str, *, idempotency_key: str) -> PaymentIntent:
        path = self._intent(intent_id) + "/cancel"
        return _pi(self._request("cancel", "post", path, idempotency_key))

    def refund(self, intent_id: str, *, idempotency_key: str) -> str:
        refund = self._request(
            "refund", "post", "/v1/refunds", idempotency_key, payment_intent=intent_id
        )
        return str(refund["id"])

    def has_refund(self, intent_id: str) -> bool:
        refunds = self._request(
            "list refunds", "get", "/v1/refunds", payment_intent=intent_id, limit=1
        )
        return bool(refunds.get("data"))

    # Events --------------------------------------------------------------------------

    def events_since(self, created_gte: int, types: list[str]) -> Iterator[dict[str, Any]]:
        """Every event of these types created at or after `created_gte` (paged)."""
        page = self._call(
            "list events",
            lambda c: c.v1.events.list(
                params={"created": {"gte": created_gte}, "types": types, "limit": 100}
            ),
        )
        for event in self._call("list events", lambda _: list(page.auto_paging_iter())):
            yield event.to_dict()

    # Webhooks ------------------------------------------------------------------------

    def verify(self, payload: bytes, header: str | None, secret: str) -> None:
        """Check `Stripe-Signature` over the raw body (constant-time, 300 s tolerance)."""
        self._sdk()
        import stripe  # noqa: PLC0415 - already loaded by _sdk

        try:
            stripe.WebhookSignature.verify_header(
                payload, header, secret, tolerance=SIGNATURE_TOLERANCE_SECONDS
            )
        except stripe.SignatureVerificationError as exc:
            raise BadSignature(str(exc).split(". ")[0]) from None
        except (UnicodeDecodeError, TypeError, ValueError):
            # A body that is not UTF-8, or a header with non-ASCII bytes: not Stripe's.
            raise BadSignature("body or Stripe-Signature header is malformed") from None
