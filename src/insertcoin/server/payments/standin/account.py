"""The fake Stripe account: every object, every state change and the events they raise, under
one lock (API calls arrive on uvicorn's threads while the background thread settles and
expires)."""

import copy
import fnmatch
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from insertcoin.server.payments.standin import params
from insertcoin.server.payments.standin.errors import CheckoutError, StripeError, invalid, no_such
from insertcoin.server.payments.standin.objects import (
    Charge,
    Event,
    Json,
    Origin,
    PaymentIntent,
    Refund,
    Session,
    new_id,
)

GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000002"
AUTOMATIC = Origin()

T = TypeVar("T")
Stored = Session | PaymentIntent | Charge | Refund


class Account:
    def __init__(
        self,
        public_url: str,
        lock: threading.RLock,
        publish: Callable[[Event], None],
        async_delay: float,
    ) -> None:
        self._public_url = public_url
        self._lock = lock
        self._publish = publish
        self._async_delay = async_delay
        self._sessions: dict[str, Session] = {}
        self._intents: dict[str, PaymentIntent] = {}
        self._charges: dict[str, Charge] = {}
        self._refunds: dict[str, Refund] = {}
        self._events: list[Event] = []
        self._event_ids: dict[str, Event] = {}
        self._timers: list[tuple[float, str]] = []  # heap: (when, session id) to expire or settle
        # A test clock: tests move time forward instead of waiting 30 minutes for expiry.
        self._clock_offset = 0.0

    def now(self) -> float:
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        with self._lock:
            self._clock_offset += seconds

    # Checkout Sessions --------------------------------------------------------------------

    def create_session(self, terms: params.CheckoutRequest, origin: Origin) -> Json:
        with self._lock:
            created = int(self.now())
            session_id = new_id("cs_test_", 58)
            session = Session(
                id=session_id,
                url=f"{self._public_url}/c/pay/{session_id}",
                created=created,
                expires_at=terms.expires_at or created + params.MAX_SESSION_LIFE,
                terms=terms,
                quantity=terms.quantity,
            )
            self._sessions[session.id] = session
            heapq.heappush(self._timers, (session.expires_at, session.id))
            return self._render(session, terms.expand)

    def retrieve_session(self, session_id: str, expand: Sequence[str]) -> Json:
        with self._lock:
            return self._render(self._session(session_id), expand)

    def expire_session(self, session_id: str, expand: Sequence[str], origin: Origin) -> Json:
        with self._lock:
            session = self._session(session_id)
            if session.status != "open":
                raise invalid(
                    f"Only Checkout Sessions with status open can be expired; this one is "
                    f"{session.status}.",
                    code="checkout_session_not_open",
                )
            self._expire(session, origin)
            return self._render(session, expand)

    def checkout_view(self, session_id: str) -> Session:
        """A copy of the session for the hosted page to render."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise CheckoutError("This checkout page does not exist.", 404)
            return copy.copy(session)

    def pay(self, session_id: str, *, card: str, quantity: int | None, method: str) -> Json:
        """What the hosted page's Pay button does; returns the session after payment."""
        with self._lock:
            session = self._open_session(session_id)
            terms = session.terms
            if method not in ("card", "bank_transfer") or not terms.accepts(method):
                raise CheckoutError("This payment method is not available for this payment.")
            chosen = session.quantity if quantity is None else quantity
            if chosen != session.quantity and terms.adjustable is None:
                raise CheckoutError("The quantity of this item cannot be changed.")
            low, high = terms.adjustable or (chosen, chosen)
            if not max(low, 1) <= chosen <= high:
                raise CheckoutError(f"Choose a quantity from {max(low, 1)} to {high}.")
            number = "".join(card.split()).replace("-", "")
            if method == "card" and number not in (GOOD_CARD, DECLINED_CARD):
                raise CheckoutError("Use test card 4242 4242 4242 4242.")
            session.quantity = chosen
            intent = self._attempt(session, method)
            if method == "card" and number == DECLINED_CARD:
                intent.status = "requires_payment_method"
                intent.last_payment_error = {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": "generic_decline",
                    "message": "Your card was declined.",
                }
                self._emit("payment_intent.payment_failed", intent, AUTOMATIC)
                raise CheckoutError("Your card was declined.", 402)
            intent.last_payment_error = None
            session.status = "complete"
            if method == "bank_transfer":
                intent.status = "processing"
                session.settle_at = self.now() + self._async_delay
                session.settle_succeeds = card.strip().lower() != "fail"
                heapq.heappush(self._timers, (session.settle_at, session.id))
            elif intent.capture_method == "manual":
                intent.status = "requires_capture"
                intent.amount_capturable = intent.amount
                self._charge(intent, captured=0)
                self._emit("payment_intent.amount_capturable_updated", intent, AUTOMATIC)
            else:
                self._succeed(intent)
                session.payment_status = "paid"
                self._emit("payment_intent.succeeded", intent, AUTOMATIC)
            self._emit("checkout.session.completed", session, AUTOMATIC)
            return session.to_json()

    def settle(self, session_id: str, succeed: bool | None = None) -> Json:
        """Let a delayed payment's funds arrive (or fail); `None`: as chosen at payment."""
        with self._lock:
            session = self._sessions.get(session_id)
            intent = self._intents.get(session.intent_id or "") if session else None
            if session is None or intent is None or intent.status != "processing":
                raise CheckoutError("No delayed payment is pending for this session.", 409)
            session.settle_at = None
            succeeds = session.settle_succeeds if succeed is None else succeed
            if succeeds:
                self._succeed(intent)
                session.payment_status = "paid"
                self._emit("payment_intent.succeeded", intent, AUTOMATIC)
                self._emit("checkout.session.async_payment_succeeded", session, AUTOMATIC)
            else:
                intent.status = "requires_payment_method"
                intent.last_payment_error = {
                    "type": "invalid_request_error",
                    "code": "payment_method_customer_decline",
                    "message": "The bank transfer failed.",
                }
                self._emit("payment_intent.payment_failed", intent, AUTOMATIC)
                self._emit("checkout.session.async_payment_failed", session, AUTOMATIC)
            return session.to_json()

    def tick(self) -> None:
        """Expire sessions past `expires_at` and settle delayed payments that are due."""
        with self._lock:
            now = self.now()
            while self._timers and self._timers[0][0] <= now:
                _, session_id = heapq.heappop(self._timers)
                session = self._sessions[session_id]
                if session.status == "open" and session.expires_at <= now:
                    self._expire(session, AUTOMATIC)
                elif session.settle_at is not None and session.settle_at <= now:
                    self.settle(session_id)

    # PaymentIntents, refunds --------------------------------------------------------------

    def retrieve_intent(self, intent_id: str, expand: Sequence[str]) -> Json:
        with self._lock:
            return self._render(self._intent(intent_id), expand)

    def capture(self, intent_id: str, request: params.Capture, origin: Origin) -> Json:
        with self._lock:
            intent = self._intent(intent_id)
            if intent.status != "requires_capture":
                raise _unexpected_state(intent, "captured", ("requires_capture",))
            amount = request.amount_to_capture or intent.amount_capturable
            if amount > intent.amount_capturable:
                raise invalid(
                    "The amount to capture must be less than or equal to the amount "
                    f"capturable ({intent.amount_capturable}).",
                    param="amount_to_capture",
                    code="amount_too_large",
                )
            self._succeed(intent, amount)
            self._emit("payment_intent.succeeded", intent, origin)
            return self._render(intent, request.expand)

    def cancel(self, intent_id: str, request: params.Cancel, origin: Origin) -> Json:
        with self._lock:
            intent = self._intent(intent_id)
            cancelable = (
                "requires_payment_method",
                "requires_capture",
                "requires_confirmation",
                "requires_action",
            )
            if intent.status not in cancelable:
                raise _unexpected_state(intent, "canceled", cancelable)
            self._cancel(intent, request.cancellation_reason, origin)
            return self._render(intent, request.expand)

    def create_refund(self, request: params.NewRefund, origin: Origin) -> Json:
        with self._lock:
            intent = self._intents.get(request.payment_intent)
            if intent is None:
                raise no_such("payment_intent", request.payment_intent, "payment_intent", 400)
            charge = self._charges.get(intent.latest_charge or "")
            if intent.status != "succeeded" or charge is None:
                raise invalid(
                    f"This PaymentIntent ({intent.id}) does not have a successful charge to "
                    f"refund: its status is {intent.status}.",
                    code="charge_not_refundable",
                )
            remaining = charge.amount_captured - charge.amount_refunded
            if remaining == 0:
                raise invalid(
                    f"Charge {charge.id} has already been refunded.",
                    code="charge_already_refunded",
                )
            amount = request.amount or remaining
            if amount > remaining:
                raise invalid(
                    f"Refund amount ({amount}) is greater than unrefunded amount on charge "
                    f"({remaining}).",
                    param="amount",
                    code="amount_too_large",
                )
            refund = Refund(
                amount=amount,
                currency=charge.currency,
                payment_intent=intent.id,
                charge=charge.id,
                reason=request.reason,
                metadata=request.metadata,
                created=int(self.now()),
            )
            self._refunds[refund.id] = refund
            charge.amount_refunded += amount
            self._emit("charge.refunded", charge, origin)
            return self._render(refund, request.expand)

    def retrieve_refund(self, refund_id: str, expand: Sequence[str]) -> Json:
        with self._lock:
            return self._render(_get(self._refunds, "refund", refund_id, "refund"), expand)

    def list_refunds(self, query: params.RefundQuery) -> Json:
        with self._lock:
            return _page(
                list(reversed(self._refunds.values())),
                lambda refund: (
                    query.payment_intent in (None, refund.payment_intent)
                    and query.page.admits(refund.created)
                ),
                query.page,
                "/v1/refunds",
            )

    # Events -------------------------------------------------------------------------------

    def event(self, event_id: str) -> Event:
        with self._lock:
            return _get(self._event_ids, "event", event_id, "id")

    def retrieve_event(self, event_id: str) -> Json:
        with self._lock:
            return self.event(event_id).to_json()

    def list_events(self, query: params.EventQuery) -> Json:
        with self._lock:
            return _page(
                self._events[::-1],
                lambda event: (
                    query.page.admits(event.created)
                    and (query.types is None or _matches(event.type, query.types))
                ),
                query.page,
                "/v1/events",
            )

    # Inside the lock ----------------------------------------------------------------------

    def _emit(self, kind: str, subject: Stored, origin: Origin) -> None:
        event = Event(
            type=kind,
            snapshot=subject.to_json(),
            created=int(self.now()),
            origin=origin,
            seq=len(self._events),
        )
        self._events.append(event)
        self._event_ids[event.id] = event
        self._publish(event)

    def _render(self, subject: Stored, expand: Iterable[str]) -> Json:
        body = subject.to_json()
        for name in expand:
            if name == "line_items" and isinstance(subject, Session):
                body[name] = subject.line_items_json()
            elif body.get(name):
                body[name] = self._lookup(body[name])
        return body

    def _lookup(self, object_id: str) -> Json:
        found = self._intents.get(object_id) or self._charges.get(object_id)
        if found is None:
            raise no_such("object", object_id, "expand")
        return found.to_json()

    def _session(self, session_id: str) -> Session:
        return _get(self._sessions, "checkout.session", session_id, "session")

    def _intent(self, intent_id: str) -> PaymentIntent:
        return _get(self._intents, "payment_intent", intent_id, "intent")

    def _open_session(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise CheckoutError("This checkout page does not exist.", 404)
        if session.status == "expired":
            raise CheckoutError(
                "This checkout session has expired. You have not been charged.", 409
            )
        if session.status == "complete":
            raise CheckoutError("This checkout session is already complete.", 409)
        return session

    def _attempt(self, session: Session, method: str) -> PaymentIntent:
        """The session's PaymentIntent for this attempt, created on the first one."""
        terms = session.terms
        manual = method == "card" and terms.manual_capture
        capture_method = "manual" if manual else "automatic_async"
        method_type = "card" if method == "card" else "customer_balance"
        intent = self._intents.get(session.intent_id or "")
        if intent is None:
            intent = PaymentIntent(
                amount=session.amount_total,
                currency=terms.currency,
                capture_method=capture_method,
                payment_method_type=method_type,
                metadata=dict(terms.intent_metadata),
                description=terms.intent_description,
                created=int(self.now()),
            )
            self._intents[intent.id] = intent
            session.intent_id = intent.id
        intent.amount = session.amount_total
        intent.capture_method, intent.payment_method_type = capture_method, method_type
        return intent

    def _charge(self, intent: PaymentIntent, captured: int) -> Charge:
        charge = Charge(
            amount=intent.amount,
            currency=intent.currency,
            payment_intent=intent.id,
            created=int(self.now()),
            amount_captured=captured,
        )
        self._charges[charge.id] = charge
        intent.latest_charge = charge.id
        return charge

    def _succeed(self, intent: PaymentIntent, amount: int | None = None) -> None:
        """Funds received: an authorization captured, or an automatic payment made."""
        received = intent.amount if amount is None else amount
        charge = self._charges.get(intent.latest_charge or "") or self._charge(intent, 0)
        charge.amount_captured = received
        intent.status = "succeeded"
        intent.amount_capturable = 0
        intent.amount_received = received

    def _cancel(self, intent: PaymentIntent, reason: str | None, origin: Origin) -> None:
        intent.status = "canceled"
        intent.amount_capturable = 0
        intent.canceled_at = int(self.now())
        intent.cancellation_reason = reason
        self._emit("payment_intent.canceled", intent, origin)

    def _expire(self, session: Session, origin: Origin) -> None:
        session.status = "expired"
        intent = self._intents.get(session.intent_id or "")
        # A declined attempt's PaymentIntent is abandoned with its session, as on Stripe.
        if intent is not None and intent.status == "requires_payment_method":
            self._cancel(intent, "abandoned", origin)
        self._emit("checkout.session.expired", session, origin)


def _get(table: dict[str, T], kind: str, object_id: str, param: str) -> T:
    found = table.get(object_id)
    if found is None:
        raise no_such(kind, object_id, param)
    return found


def _matches(kind: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(kind, pattern) for pattern in patterns)


def _unexpected_state(intent: PaymentIntent, verb: str, allowed: Sequence[str]) -> StripeError:
    return invalid(
        f"This PaymentIntent could not be {verb} because it has a status of {intent.status}. "
        f"Only a PaymentIntent with one of the following statuses may be {verb}: "
        f"{', '.join(allowed)}.",
        code="payment_intent_unexpected_state",
    )


class _Listed(Protocol):
    @property
    def id(self) -> str: ...

    def to_json(self) -> Json: ...


L = TypeVar("L", bound=_Listed)


def _page(
    newest_first: Sequence[L], matches: Callable[[L], bool], page: params.Page, url: str
) -> Json:
    """One page of a Stripe list, newest first, after (or before) a cursor that must exist."""
    ids = [item.id for item in newest_first]
    cursor = page.starting_after or page.ending_before
    if cursor is not None and cursor not in ids:
        param = "starting_after" if page.starting_after else "ending_before"
        raise no_such("object", cursor, param, 400)
    if page.ending_before is not None:
        # Newer than the cursor: the `limit` items closest to it.
        newer = [item for item in newest_first[: ids.index(page.ending_before)] if matches(item)]
        data, has_more = newer[-page.limit :], len(newer) > page.limit
    else:
        start = ids.index(page.starting_after) + 1 if page.starting_after else 0
        older = (item for item in newest_first[start:] if matches(item))
        data = list(itertools.islice(older, page.limit + 1))
        data, has_more = data[: page.limit], len(data) > page.limit
    return {
        "object": "list",
        "data": [item.to_json() for item in data],
        "has_more": has_more,
        "url": url,
    }
