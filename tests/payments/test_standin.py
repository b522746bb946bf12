"""The Stripe stand-in, spoken to by the real `stripe` SDK over real HTTP: the checkout,
capture, cancel and refund flow, Stripe's validation and idempotency, webhook delivery, and
the control handles tests use to make Stripe misbehave."""

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
import uvicorn
from fastapi import FastAPI

from insertcoin.server.payments.standin import StandIn
from insertcoin.server.payments.standin.errors import CheckoutError
from tests.support.services import free_port, wait_port
from tests.support.standin import (
    WEBHOOK_SECRET,
    StandInThread,
    WebhookReceiver,
    standin_process,
    standin_thread,
    stripe_client,
    webhook_receiver,
)

GOOD_CARD = "4242 4242 4242 4242"
DECLINED_CARD = "4000 0000 0000 0002"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as running:
        yield running


@pytest.fixture
def stand(receiver: WebhookReceiver) -> Iterator[StandInThread]:
    with standin_thread(receiver.url, retry_delays=(0.2, 0.3), async_delay=0.3) as running:
        yield running


@pytest.fixture
def client(stand: StandInThread) -> stripe.StripeClient:
    return stand.client()


def session_params(**overrides: Any) -> dict[str, Any]:
    """What the server sends for a cabinet: manual capture, adjustable quantity."""
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 100,
                    "product_data": {"name": "1 credit on Pac-Man"},
                },
                "quantity": 1,
                "adjustable_quantity": {"enabled": True, "minimum": 1, "maximum": 5},
            }
        ],
        "client_reference_id": "pacman-1",
        "metadata": {"machine_id": "pacman-1"},
        "payment_intent_data": {
            "metadata": {"machine_id": "pacman-1"},
            "description": "Credits for pacman-1",
        },
        "payment_method_options": {"card": {"capture_method": "manual"}},
        "payment_method_types": ["card", "customer_balance"],
        "success_url": "http://arcade.test/pay/pacman-1/done?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "http://arcade.test/pay/pacman-1/cancelled",
        "expires_at": int(time.time()) + 31 * 60,
        "customer_email": "player@example.com",
        "locale": "auto",
    }
    params.update(overrides)
    return params


def submit(url: str, **fields: str) -> httpx.Response:
    """Post the hosted checkout form, as a browser would."""
    form = {"card_number": GOOD_CARD, "method": "card", "action": "pay", **fields}
    return httpx.post(url, data=form, follow_redirects=False)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def verified(receiver: WebhookReceiver) -> list[stripe.Event]:
    return [
        stripe.Webhook.construct_event(
            received.body, received.headers["Stripe-Signature"], WEBHOOK_SECRET, tolerance=300
        )
        for received in receiver.received
    ]


def test_created_session_has_stripes_shape(client: stripe.StripeClient, stand: StandInThread):
    """A session created with exactly the server's parameters comes back open and unpaid,
    in Stripe's shape, with a hosted page URL on the stand-in."""
    params = session_params()
    session = client.v1.checkout.sessions.create(params=params)
    assert session.id.startswith("cs_test_")
    assert session.object == "checkout.session"
    assert session.url == f"{stand.url}/c/pay/{session.id}"
    assert (session.status, session.payment_status, session.mode) == ("open", "unpaid", "payment")
    assert (session.amount_subtotal, session.amount_total, session.currency) == (100, 100, "usd")
    assert session.client_reference_id == "pacman-1"
    assert session.metadata.to_dict() == {"machine_id": "pacman-1"}
    assert session.payment_intent is None
    assert session.expires_at == params["expires_at"]
    assert session.livemode is False
    assert "{CHECKOUT_SESSION_ID}" in session.success_url
    page = httpx.get(session.url)
    assert page.status_code == 200
    for element in ("id=card-number", "id=quantity", "id=pay", "id=cancel", "id=error"):
        assert element in page.text
    assert "1 credit on Pac-Man" in page.text
    assert "1.00 USD" in page.text


def test_authorize_capture_and_webhooks(client: stripe.StripeClient, receiver: WebhookReceiver):
    """Paying on the hosted page with a chosen quantity authorizes (manual capture): 303 to
    the success URL with the session id, session complete but unpaid, PaymentIntent
    `requires_capture` with the session's metadata; capture makes it `succeeded`. Every
    webhook verifies with `stripe.Webhook.construct_event`."""
    session = client.v1.checkout.sessions.create(params=session_params())
    answer = submit(session.url, quantity="3")
    assert answer.status_code == 303
    assert answer.headers["location"] == (
        f"http://arcade.test/pay/pacman-1/done?session_id={session.id}"
    )
    paid = client.v1.checkout.sessions.retrieve(
        session.id, params={"expand": ["payment_intent", "line_items"]}
    )
    assert (paid.status, paid.payment_status, paid.amount_total) == ("complete", "unpaid", 300)
    assert paid.url is None
    intent = paid.payment_intent
    assert isinstance(intent, stripe.PaymentIntent)
    assert intent.id.startswith("pi_")
    assert (intent.status, intent.capture_method) == ("requires_capture", "manual")
    assert (intent.amount, intent.amount_capturable, intent.amount_received) == (300, 300, 0)
    assert intent.metadata.to_dict() == {"machine_id": "pacman-1"}
    [item] = paid.line_items.data
    assert (item.quantity, item.amount_total, item.price.unit_amount) == (3, 300, 100)

    captured = client.v1.payment_intents.capture(intent.id)
    assert (captured.status, captured.amount_received, captured.amount_capturable) == (
        "succeeded",
        300,
        0,
    )
    assert captured.latest_charge.startswith("ch_")
    assert client.v1.payment_intents.retrieve(intent.id).status == "succeeded"

    expected = [
        "payment_intent.amount_capturable_updated",
        "checkout.session.completed",
        "payment_intent.succeeded",
    ]
    receiver.wait_for(lambda events: len(events) == 3)
    events = verified(receiver)
    assert [event.type for event in events] == expected
    completed = events[1]
    assert completed.id.startswith("evt_")
    assert completed.data.object.id == session.id
    assert completed.data.object.payment_intent == intent.id
    assert completed.request.id is None  # caused by the customer, not an API call
    assert events[2].request.id is not None  # caused by our capture call
    assert completed.livemode is False


def test_cancel_authorization_and_unexpected_states(client: stripe.StripeClient):
    """Canceling an authorization makes it `canceled`; capturing or canceling it again is
    refused with `payment_intent_unexpected_state`, as is capturing an automatic payment."""
    session = client.v1.checkout.sessions.create(params=session_params())
    submit(session.url)
    intent_id = client.v1.checkout.sessions.retrieve(session.id).payment_intent
    canceled = client.v1.payment_intents.cancel(intent_id)
    assert canceled.status == "canceled"
    for again in (client.v1.payment_intents.capture, client.v1.payment_intents.cancel):
        with pytest.raises(stripe.InvalidRequestError) as refused:
            again(intent_id)
        assert refused.value.code == "payment_intent_unexpected_state"


def test_automatic_payment_refunds(client: stripe.StripeClient, receiver: WebhookReceiver):
    """Without manual capture the payment succeeds at once (`paid`); refunds are allowed up
    to what was received, each raising `charge.refunded`; an uncaptured authorization has
    nothing to refund."""
    params = session_params(payment_method_options=None, payment_intent_data=None)
    session = client.v1.checkout.sessions.create(params=params)
    submit(session.url, quantity="2")
    paid = client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["payment_intent"]})
    assert paid.payment_status == "paid"
    assert (paid.payment_intent.status, paid.payment_intent.capture_method) == (
        "succeeded",
        "automatic_async",
    )
    intent_id = paid.payment_intent.id

    first = client.v1.refunds.create(params={"payment_intent": intent_id, "amount": 50})
    assert (first.id[:3], first.status, first.amount) == ("re_", "succeeded", 50)
    with pytest.raises(stripe.InvalidRequestError) as too_much:
        client.v1.refunds.create(params={"payment_intent": intent_id, "amount": 151})
    assert (too_much.value.param, too_much.value.code) == ("amount", "amount_too_large")
    rest = client.v1.refunds.create(params={"payment_intent": intent_id, "reason": "duplicate"})
    assert rest.amount == 150
    assert client.v1.refunds.retrieve(rest.id).reason == "duplicate"
    listed = client.v1.refunds.list(params={"payment_intent": intent_id, "limit": 1})
    assert [refund.id for refund in listed.data] == [rest.id]
    assert listed.has_more
    charge = client.v1.payment_intents.retrieve(
        intent_id, params={"expand": ["latest_charge"]}
    ).latest_charge
    assert (charge.amount_refunded, charge.refunded) == (200, True)
    receiver.wait_for(lambda events: [e["type"] for e in events].count("charge.refunded") == 2)

    manual = client.v1.checkout.sessions.create(params=session_params())
    submit(manual.url)
    authorized = client.v1.checkout.sessions.retrieve(manual.id).payment_intent
    with pytest.raises(stripe.InvalidRequestError) as nothing:
        client.v1.refunds.create(params={"payment_intent": authorized})
    assert nothing.value.code == "charge_not_refundable"


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"foo": "bar"}, "foo", None),
        ({"mode": "subscription"}, "mode", None),
        ({"line_items": None}, "line_items", "parameter_missing"),
        ({"client_reference_id": "x" * 201}, "client_reference_id", "string_too_long"),
        ({"metadata": {f"k{i}": "v" for i in range(51)}}, "metadata", None),
        ({"metadata": {"k" * 41: "v"}}, f"metadata[{'k' * 41}]", None),
        ({"expires_at": int(time.time()) + 60}, "expires_at", None),
        ({"expires_at": int(time.time()) + 25 * 3600}, "expires_at", None),
        ({"success_url": "not a url"}, "success_url", "url_invalid"),
        ({"customer_email": "nobody"}, "customer_email", "email_invalid"),
        ({"payment_method_types": ["cash"]}, "payment_method_types[0]", None),
        ({"payment_method_options": {"card": {"capture_method": "later"}}}, None, None),
    ],
)
def test_invalid_session_parameters(
    client: stripe.StripeClient, change: dict[str, Any], param: str | None, code: str | None
):
    """Parameters Stripe would refuse are refused with `InvalidRequestError` naming the
    param: unknown keys, wrong enums, missing or too-long values, metadata limits, an expiry
    outside 30 min to 24 h, malformed URL / email, unknown payment methods."""
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.checkout.sessions.create(params=session_params(**change))
    assert refused.value.http_status == 400
    assert refused.value.param == (param or "payment_method_options[card][capture_method]")
    assert refused.value.code == code


@pytest.mark.parametrize(
    ("item_change", "param", "code"),
    [
        ({"foo": 1}, "line_items[0][foo]", None),
        (
            {"price_data": {"currency": "USD", "unit_amount": 100, "product_data": {"name": "x"}}},
            "line_items[0][price_data][currency]",
            None,
        ),
        (
            {"price_data": {"currency": "usdx", "unit_amount": 100, "product_data": {"name": "x"}}},
            "line_items[0][price_data][currency]",
            None,
        ),
        (
            {"price_data": {"currency": "usd", "unit_amount": 49, "product_data": {"name": "x"}}},
            "line_items[0][price_data][unit_amount]",
            "amount_too_small",
        ),
        (
            {"price_data": {"currency": "hkd", "unit_amount": 399, "product_data": {"name": "x"}}},
            "line_items[0][price_data][unit_amount]",
            "amount_too_small",
        ),
        (
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": "1.5",
                    "product_data": {"name": "x"},
                }
            },
            "line_items[0][price_data][unit_amount]",
            "parameter_invalid_integer",
        ),
        (
            {"price_data": {"currency": "usd", "unit_amount": 100}},
            "line_items[0][price_data][product_data]",
            "parameter_missing",
        ),
        ({"quantity": 6}, "line_items[0][quantity]", None),
        (
            {"adjustable_quantity": {"enabled": "yes"}},
            "line_items[0][adjustable_quantity][enabled]",
            None,
        ),
    ],
)
def test_invalid_line_items(
    client: stripe.StripeClient, item_change: dict[str, Any], param: str, code: str | None
):
    """A bad line item is refused with the nested param's name: unknown keys, a currency
    that is not three lowercase letters, an amount below Stripe's minimum charge for the
    currency (`amount_too_small`), a non-integer amount, a quantity outside the adjustable
    bounds."""
    params = session_params()
    params["line_items"][0].update(item_change)
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.checkout.sessions.create(params=params)
    assert (refused.value.param, refused.value.code) == (param, code)


def test_unknown_objects_are_missing(client: stripe.StripeClient):
    """Unknown ids answer 404 `resource_missing` with Stripe's wording; an unknown route is
    a Stripe-shaped 404 too."""
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.checkout.sessions.retrieve("cs_test_nope")
    assert missing.value.http_status == 404
    assert missing.value.code == "resource_missing"
    assert missing.value.user_message == "No such checkout.session: 'cs_test_nope'"
    for retrieve in (client.v1.payment_intents.retrieve, client.v1.events.retrieve):
        with pytest.raises(stripe.InvalidRequestError):
            retrieve("nope")
    with pytest.raises(stripe.InvalidRequestError) as unrouted:
        client.v1.customers.retrieve("cus_1")
    assert unrouted.value.http_status == 404


def test_idempotent_requests(client: stripe.StripeClient, stand: StandInThread):
    """The same key with the same parameters replays the first answer (one session,
    `Idempotent-Replayed: true`); other parameters under that key raise `IdempotencyError`;
    a request refused by validation stores nothing, so its key can be used again."""
    params = session_params()
    first = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "k1"})
    again = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "k1"})
    assert again.id == first.id
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert again.last_response.request_id == first.last_response.request_id
    with pytest.raises(stripe.IdempotencyError):
        client.v1.checkout.sessions.create(
            params=session_params(client_reference_id="other"),
            options={"idempotency_key": "k1"},
        )
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.create(
            params=session_params(foo="bar"), options={"idempotency_key": "k2"}
        )
    fixed = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "k2"})
    assert fixed.id != first.id


def test_faults_and_stored_errors(client: stripe.StripeClient, stand: StandInThread):
    """An injected 500 before the effect is stored under its key and replayed for that key
    (nothing was created); a 500 after the effect leaves the capture done while the caller
    sees an error, replayed for the same key; a slow answer makes a short-timeout client
    fail although the capture happened, and the same key then replays the success."""
    faults = stand.standin.faults
    faults.add("POST", "/v1/checkout/sessions", status=500)
    with pytest.raises(stripe.APIError) as failed:
        client.v1.checkout.sessions.create(
            params=session_params(), options={"idempotency_key": "s1"}
        )
    assert failed.value.http_status == 500
    with pytest.raises(stripe.APIError) as replayed:
        client.v1.checkout.sessions.create(
            params=session_params(), options={"idempotency_key": "s1"}
        )
    assert replayed.value.headers["Idempotent-Replayed"] == "true"
    assert replayed.value.headers["Stripe-Should-Retry"] == "false"
    assert client.v1.events.list().data == []

    session = client.v1.checkout.sessions.create(params=session_params())
    stand.standin.pay(session.id)
    intent_id = client.v1.checkout.sessions.retrieve(session.id).payment_intent
    faults.add("POST", "/capture", status=503, when="after")
    with pytest.raises(stripe.APIError):
        client.v1.payment_intents.capture(intent_id, options={"idempotency_key": "c1"})
    assert client.v1.payment_intents.retrieve(intent_id).status == "succeeded"
    with pytest.raises(stripe.APIError) as still:
        client.v1.payment_intents.capture(intent_id, options={"idempotency_key": "c1"})
    assert still.value.http_status == 503

    other = client.v1.checkout.sessions.create(params=session_params())
    stand.standin.pay(other.id)
    other_intent = client.v1.checkout.sessions.retrieve(other.id).payment_intent
    faults.add("POST", f"/v1/payment_intents/{other_intent}/capture", delay=0.5)
    impatient = stand.client(http_client=stripe.RequestsClient(timeout=0.2))
    with pytest.raises(stripe.APIConnectionError):
        impatient.v1.payment_intents.capture(other_intent, options={"idempotency_key": "c2"})
    retried = client.v1.payment_intents.capture(other_intent, options={"idempotency_key": "c2"})
    assert retried.status == "succeeded"
    assert retried.last_response.headers["Idempotent-Replayed"] == "true"


def test_declined_and_invalid_cards(client: stripe.StripeClient, receiver: WebhookReceiver):
    """A declined card re-renders the page with "Your card was declined." in `#error`,
    leaves the session open and raises `payment_intent.payment_failed`; an unknown number
    asks for the test card; the good card then pays the same session."""
    session = client.v1.checkout.sessions.create(params=session_params())
    declined = submit(session.url, card_number=DECLINED_CARD)
    assert declined.status_code == 402
    assert "<p id=error role=alert>Your card was declined.</p>" in declined.text
    assert client.v1.checkout.sessions.retrieve(session.id).status == "open"
    receiver.wait_for(lambda events: "payment_intent.payment_failed" in [e["type"] for e in events])
    unknown = submit(session.url, card_number="1234 5678")
    assert "Use test card 4242 4242 4242 4242" in unknown.text
    assert submit(session.url, quantity="9").status_code == 400  # outside 1..5
    assert submit(session.url).status_code == 303
    paid = client.v1.checkout.sessions.retrieve(session.id, params={"expand": ["payment_intent"]})
    assert paid.payment_intent.status == "requires_capture"
    assert paid.payment_intent.last_payment_error is None
    again = submit(session.url)
    assert "already complete" in again.text


def test_cancel_button_redirects(client: stripe.StripeClient):
    """Cancel on the hosted page goes to `cancel_url` and leaves the session open."""
    session = client.v1.checkout.sessions.create(params=session_params())
    answer = submit(session.url, action="cancel")
    assert (answer.status_code, answer.headers["location"]) == (
        303,
        "http://arcade.test/pay/pacman-1/cancelled",
    )
    assert client.v1.checkout.sessions.retrieve(session.id).status == "open"


@pytest.mark.parametrize(
    ("account", "intent_status", "session_event"),
    [
        ("DE89 3704 0044 0532 0130 00", "succeeded", "checkout.session.async_payment_succeeded"),
        ("fail", "requires_payment_method", "checkout.session.async_payment_failed"),
    ],
)
def test_delayed_payment_settles(
    client: stripe.StripeClient,
    receiver: WebhookReceiver,
    account: str,
    intent_status: str,
    session_event: str,
):
    """A bank transfer completes the session unpaid with the PaymentIntent `processing`;
    `async_delay` later it succeeds (session `paid`) or, for the account "fail", fails, each
    with its `checkout.session.async_payment_*` event."""
    session = client.v1.checkout.sessions.create(params=session_params())
    assert submit(session.url, method="bank_transfer", card_number=account).status_code == 303
    pending = client.v1.checkout.sessions.retrieve(
        session.id, params={"expand": ["payment_intent"]}
    )
    assert (pending.status, pending.payment_status) == ("complete", "unpaid")
    assert (pending.payment_intent.status, pending.payment_intent.capture_method) == (
        "processing",
        "automatic_async",
    )
    receiver.wait_for(lambda events: session_event in [e["type"] for e in events])
    settled = client.v1.checkout.sessions.retrieve(
        session.id, params={"expand": ["payment_intent"]}
    )
    assert settled.payment_intent.status == intent_status
    assert settled.payment_status == ("paid" if intent_status == "succeeded" else "unpaid")
    assert receiver.types()[0] == "checkout.session.completed"


def test_events_paging_and_filters(client: stripe.StripeClient, stand: StandInThread):
    """`/v1/events` lists newest first; `auto_paging_iter()` walks every page forwards (and
    backwards from `ending_before`); `created` bounds and `type` / `types` filter."""
    sessions = [client.v1.checkout.sessions.create(params=session_params()) for _ in range(5)]
    for session in sessions[:3]:
        client.v1.checkout.sessions.expire(session.id)
    stand.standin.advance_clock(10)
    for session in sessions[3:]:
        client.v1.checkout.sessions.expire(session.id)
    newest_first = [s.id for s in reversed(sessions)]

    listed = client.v1.events.list(params={"limit": 2})
    assert (len(listed.data), listed.has_more, listed.url) == (2, True, "/v1/events")
    events = list(listed.auto_paging_iter())
    assert [event.data.object.id for event in events] == newest_first
    assert all(event.type == "checkout.session.expired" for event in events)
    backwards = client.v1.events.list(params={"limit": 2, "ending_before": events[-1].id})
    assert [e.id for e in backwards.auto_paging_iter()] == [e.id for e in reversed(events[:-1])]

    # The two later events can straddle a second; the older one bounds both.
    later = events[1].created
    recent = client.v1.events.list(params={"created": {"gte": later}})
    assert [event.id for event in recent.data] == [event.id for event in events[:2]]
    older = client.v1.events.list(params={"created": {"lt": later}, "limit": 100})
    assert len(older.data) == 3
    assert client.v1.events.list(params={"type": "checkout.session.*"}).data
    assert client.v1.events.list(params={"types": ["payment_intent.succeeded"]}).data == []
    assert client.v1.events.retrieve(events[0].id).id == events[0].id
    with pytest.raises(stripe.InvalidRequestError) as bad_limit:
        client.v1.events.list(params={"limit": 101})
    assert bad_limit.value.param == "limit"


def test_expiry_by_time_and_by_api(client: stripe.StripeClient, stand: StandInThread):
    """A session past `expires_at` expires by itself (`checkout.session.expired`) and its
    page then says so; expiring a session that is not open is refused."""
    session = client.v1.checkout.sessions.create(params=session_params())
    stand.standin.advance_clock(32 * 60)
    wait_until(lambda: client.v1.checkout.sessions.retrieve(session.id).status == "expired")
    assert client.v1.events.list(params={"type": "checkout.session.expired"}).data
    page = submit(session.url)
    assert (page.status_code, "expired" in page.text) == (409, True)
    with pytest.raises(CheckoutError):
        stand.standin.pay(session.id)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.expire(session.id)


def test_webhook_signature_and_retries(
    client: stripe.StripeClient, stand: StandInThread, receiver: WebhookReceiver
):
    """A receiver answering 500 gets the event again after each retry delay, re-signed with
    a fresh timestamp; every attempt verifies; the log records each attempt's status."""
    receiver.answers = [500, 500]
    session = client.v1.checkout.sessions.create(params=session_params())
    client.v1.checkout.sessions.expire(session.id)
    receiver.wait_for(lambda events: len(events) == 3)
    events = verified(receiver)
    assert {event.id for event in events} == {events[0].id}
    wait_until(lambda: len(stand.standin.deliveries()) == 3)
    assert [d["attempt"] for d in stand.standin.deliveries()] == [1, 2, 3]
    assert [d["status"] for d in stand.standin.deliveries()] == [500, 500, 200]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(
            receiver.received[0].body, receiver.received[0].headers["Stripe-Signature"], "whsec_x"
        )
    assert client.v1.events.retrieve(events[0].id).pending_webhooks == 0


def test_paused_dropped_and_resent_webhooks(
    client: stripe.StripeClient, stand: StandInThread, receiver: WebhookReceiver
):
    """Paused, events queue and are delivered on resume; a dropped event is never delivered
    but is listed in `/v1/events`; a resend delivers it."""
    stand.standin.pause_webhooks(True)
    first = client.v1.checkout.sessions.create(params=session_params())
    client.v1.checkout.sessions.expire(first.id)
    time.sleep(0.3)
    assert receiver.events() == []
    stand.standin.pause_webhooks(False)
    receiver.wait_for(lambda events: len(events) == 1)

    stand.standin.drop_next_webhooks(1)
    second = client.v1.checkout.sessions.create(params=session_params())
    client.v1.checkout.sessions.expire(second.id)
    time.sleep(0.3)
    assert len(receiver.events()) == 1
    [missed] = client.v1.events.list(params={"limit": 1}).data
    assert missed.data.object.id == second.id
    stand.standin.resend(missed.id)
    events = receiver.wait_for(lambda events: len(events) == 2)
    assert events[1]["id"] == missed.id


def test_api_keys(receiver: WebhookReceiver):
    """Without a configured key any `sk_test_` key works and others are refused; with one,
    only that key works — refused calls raise `stripe.AuthenticationError`."""
    with standin_thread(None) as any_test_key:
        assert any_test_key.client("sk_test_whatever").v1.events.list().data == []
        with pytest.raises(stripe.AuthenticationError):
            any_test_key.client("sk_live_real").v1.events.list()
        assert httpx.get(f"{any_test_key.url}/v1/events").status_code == 401
    with standin_thread(None, api_key="sk_test_only") as one_key:
        one_key.client("sk_test_only").v1.events.list()
        with pytest.raises(stripe.AuthenticationError):
            one_key.client("sk_test_other").v1.events.list()


def test_mounted_under_a_prefix():
    """Mounted at `/_stripe` on another app (simulated payments), the SDK, the hosted page
    and path-suffix faults work under the prefix."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/_stripe"
    standin = StandIn(public_url=base, webhook_url=None, webhook_secret=WEBHOOK_SECRET)
    server_app = FastAPI()
    server_app.mount("/_stripe", standin.app)
    server = uvicorn.Server(uvicorn.Config(server_app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_port(port)
        client = stripe_client(base)
        session = client.v1.checkout.sessions.create(params=session_params())
        assert session.url == f"{base}/c/pay/{session.id}"
        assert submit(session.url).status_code == 303
        standin.faults.add("GET", f"/{session.id}")
        with pytest.raises(stripe.APIError):
            client.v1.checkout.sessions.retrieve(session.id)
        assert client.v1.checkout.sessions.retrieve(session.id).status == "complete"
    finally:
        server.should_exit = True
        thread.join(10)


def test_standalone_process_control_routes(tmp_path: Path, receiver: WebhookReceiver):
    """The standalone runner prints its ready line; `/_control` pays a session, injects a
    fault, settles a delayed payment, lists deliveries and resends an event."""
    with standin_process(tmp_path, receiver.url, "--retry-delays", "0.2,0.5") as stand:
        assert stand.ready_line == f"stripe stand-in listening on {stand.url}"
        client = stand.client()
        session = client.v1.checkout.sessions.create(params=session_params())
        paid = stand.control.post(f"/sessions/{session.id}/pay", json={"quantity": 2})
        assert paid.status_code == 200
        assert paid.json()["redirect"].endswith(f"session_id={session.id}")
        assert paid.json()["session"]["amount_total"] == 200
        declined = stand.control.post(f"/sessions/{session.id}/pay", json={"card": DECLINED_CARD})
        assert declined.status_code == 409  # already complete

        fault = {"method": "POST", "path": "/capture", "status": 502, "count": 1}
        assert stand.control.post("/faults", json=fault).status_code == 200
        intent_id = client.v1.checkout.sessions.retrieve(session.id).payment_intent
        with pytest.raises(stripe.APIError):
            client.v1.payment_intents.capture(intent_id)
        assert client.v1.payment_intents.capture(intent_id).status == "succeeded"

        delayed = client.v1.checkout.sessions.create(params=session_params())
        stand.control.post(f"/sessions/{delayed.id}/pay", json={"method": "bank_transfer"})
        settled = stand.control.post(
            f"/sessions/{delayed.id}/settle_async", json={"succeed": False}
        )
        assert settled.json()["status"] == "complete"
        receiver.wait_for(
            lambda events: "checkout.session.async_payment_failed" in [e["type"] for e in events]
        )

        stand.control.post("/webhooks", json={"drop_next": 1})
        dropped = client.v1.checkout.sessions.create(params=session_params())
        client.v1.checkout.sessions.expire(dropped.id)
        [event] = client.v1.events.list(params={"limit": 1}).data
        time.sleep(0.3)
        assert event.id not in {e["id"] for e in receiver.events()}
        assert stand.control.get(f"/events/{event.id}/resend").status_code == 200
        receiver.wait_for(lambda events: event.id in {e["id"] for e in events})
        wait_until(
            lambda: event.id in {d["event"] for d in stand.control.get("/deliveries").json()}
        )
        deliveries = stand.control.get("/deliveries").json()
        assert {"event": event.id, "type": event.type, "attempt": 1, "status": 200} in deliveries
        assert all(d["status"] == 200 for d in deliveries)
