"""Stripe webhooks and the pay routes under duplication, attack and garbage
(GUARANTEES G1, G5, G6, G9; scenarios 1, 2 and 8), against the real server and the
stand-in Stripe: every number below must hold exactly.

Most tests share one shop per module (SQLite, Mosquitto) and use cabinets of their own;
the 500-purchase scenario and the rate-limit test build shops of their own, because
they pause the stand-in's webhooks or need other settings.
"""

import functools
import json
import random
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import stripe
from sqlalchemy import func, select

from insertcoin.protocol import Topics
from insertcoin.server.payments.standin.errors import CheckoutError
from insertcoin.server.store.tables import checkouts, grants, purchases, stripe_events
from insertcoin.server.web.errors import MAX_BODY_BYTES
from tests.support.cabinet import FakeCabinets
from tests.support.payments import Shop
from tests.support.server import add_cabinet
from tests.support.services import mosquitto, postgres_schema
from tests.support.standin import WEBHOOK_SECRET

PATHS = ("/webhooks/stripe", "/addCredit")
COMPLETED = "checkout.session.completed"
MODULE_PREFIX = f"test/{uuid.uuid4().hex[:8]}/machine"


# --- helpers ------------------------------------------------------------------------------


def _wait(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _sign(payload: str | bytes, *, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    text = payload.decode() if isinstance(payload, bytes) else payload
    header: str = stripe.WebhookSignature.generate_signature_header(
        text, secret, timestamp=int(time.time()) if at is None else at
    )
    return header


def _body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def _post(
    client: httpx.Client, path: str, body: bytes, signature: str | bytes | None
) -> httpx.Response:
    headers: dict[bytes, bytes] = {b"Content-Type": b"application/json"}
    if signature is not None:
        # Bytes: a header may carry any octet, as an attacker's would.
        headers[b"Stripe-Signature"] = (
            signature.encode("latin-1") if isinstance(signature, str) else signature
        )
    return client.post(path, content=body, headers=headers)


def _deliver(shop: Shop, event: dict[str, Any], path: str = PATHS[0]) -> httpx.Response:
    """POST an event as Stripe would: its JSON body, freshly signed with the right secret."""
    body = _body(event)
    return _post(shop.http, path, body, _sign(body))


def _crafted(kind: str, obj: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    """An event shaped like Stripe's, about `obj`, that Stripe never sent."""
    return {
        "id": event_id or f"evt_test_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
    }


def _events(shop: Shop, object_ids: set[str], kind: str | None = None) -> list[dict[str, Any]]:
    """Events the stand-in raised about these objects (newest first), via the SDK."""
    params: dict[str, Any] = {"limit": 100}
    if kind is not None:
        params["type"] = kind
    found = []
    listed = shop.stripe.v1.events.list(params=params)  # type: ignore[arg-type]
    for event in listed.auto_paging_iter():
        data = event.to_dict()
        if data["data"]["object"]["id"] in object_ids:
            found.append(data)
    return found


def _event_of(shop: Shop, object_id: str, kind: str) -> dict[str, Any]:
    [event] = _events(shop, {object_id}, kind)
    return event


def _inbox(shop: Shop, event_id: str) -> dict[str, Any] | None:
    with shop.server.runtime.db.read() as conn:
        row = (
            conn.execute(select(stripe_events).where(stripe_events.c.id == event_id))
            .mappings()
            .first()
        )
    return None if row is None else dict(row)


def _processed(shop: Shop, event_id: str) -> dict[str, Any]:
    """The inbox row of an event, once the intake has processed it."""
    row: dict[str, Any] = _wait(
        lambda: (r := _inbox(shop, event_id)) is not None and r["processed_at"] is not None and r,
        f"event {event_id} to be processed",
    )
    return row


def _processed_results(shop: Shop, event_ids: list[str]) -> Counter[str]:
    """How the intake ended each of these events, counted by result."""
    with shop.server.runtime.db.read() as conn:
        rows = conn.execute(
            select(stripe_events.c.result).where(
                stripe_events.c.id.in_(event_ids), stripe_events.c.processed_at.is_not(None)
            )
        )
        return Counter(result for (result,) in rows)


def _inbox_rows_about(shop: Shop, session_id: str) -> int:
    with shop.server.runtime.db.read() as conn:
        count: int = conn.execute(
            select(func.count())
            .select_from(stripe_events)
            .where(stripe_events.c.object_id == session_id)
        ).scalar_one()
    return count


def _grants(shop: Shop, *machine_ids: str) -> list[dict[str, Any]]:
    """Purchase grants created for these cabinets."""
    with shop.server.runtime.db.read() as conn:
        rows = conn.execute(
            select(grants).where(
                grants.c.machine_id.in_(machine_ids), grants.c.source == "purchase"
            )
        ).mappings()
        return [dict(row) for row in rows]


def _purchases(shop: Shop, *machine_ids: str) -> list[dict[str, Any]]:
    with shop.server.runtime.db.read() as conn:
        rows = conn.execute(select(purchases).where(purchases.c.machine_id.in_(machine_ids)))
        return [dict(row) for row in rows.mappings()]


def _sessions_opened(shop: Shop) -> int:
    """Checkout Sessions that exist on the stand-in Stripe (its own records)."""
    return len(shop.standin.standin._account._sessions)


def _checkout_rows(shop: Shop, *machine_ids: str) -> int:
    with shop.server.runtime.db.read() as conn:
        count: int = conn.execute(
            select(func.count())
            .select_from(checkouts)
            .where(checkouts.c.machine_id.in_(machine_ids))
        ).scalar_one()
    return count


def _delivered(shop: Shop, event_id: str) -> int:
    """How many of the stand-in's deliveries of this event the server answered 2xx."""
    return sum(
        1
        for d in shop.standin.standin.deliveries()
        if d["event"] == event_id and isinstance(d["status"], int) and 200 <= d["status"] < 300
    )


def _delivered_times(shop: Shop, event_id: str, times: int) -> bool:
    return _delivered(shop, event_id) == times


def _wait_online(shop: Shop, machine_id: str, online: bool = True) -> None:
    _wait(
        lambda: shop.server.runtime.registry.get(machine_id).online is online,
        f"{machine_id} online={online}",
    )


def _session_id_of(response: httpx.Response) -> str:
    assert response.status_code == 303, response.text
    return urlsplit(response.headers["location"]).path.rsplit("/", 1)[-1]


def _direct_session(
    shop: Shop, *, machine_id: str, unit_amount: int, quantity: int = 1, **extra: Any
) -> str:
    """A Checkout Session made straight through the SDK (not by the server's /pay)."""
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": unit_amount,
                    "product_data": {"name": "credits"},
                },
                "quantity": quantity,
            }
        ],
        "metadata": {"machine_id": machine_id},
        "client_reference_id": machine_id,
        "payment_intent_data": {"metadata": {"machine_id": machine_id}},
        "payment_method_options": {"card": {"capture_method": "manual"}},
        "success_url": "http://127.0.0.1/done?session_id={CHECKOUT_SESSION_ID}",
    }
    params.update(extra)
    session = shop.stripe.v1.checkout.sessions.create(params=params)  # type: ignore[arg-type]
    return str(session.id)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mosquitto(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running.url


@pytest.fixture(scope="module")
def module_shop(module_broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    db = tmp_path_factory.mktemp("shop") / "insertcoin.db"
    shop = Shop(f"sqlite:///{db}", module_broker, MODULE_PREFIX, shared=True)
    # Delayed payments settle when a test says so, never by themselves halfway through it.
    shop.standin.standin._account._async_delay = 3600.0
    try:
        yield shop
    finally:
        shop.stop()


class Bench:
    """Cabinets of one test on the module's shop: unique ids, and fake cabinets that
    come online and ack."""

    def __init__(self, shop: Shop, broker_url: str, topics: Topics) -> None:
        self.shop = shop
        self.broker_url = broker_url
        self.topics = topics
        self.started: list[FakeCabinets] = []

    def cabinet(self, tag: str) -> str:
        machine_id = f"{tag}-{uuid.uuid4().hex[:8]}"
        add_cabinet(self.shop.admin, machine_id)
        return machine_id

    def online(self, *machine_ids: str, ack: bool = True) -> FakeCabinets:
        cabinets = FakeCabinets(self.broker_url, self.topics, list(machine_ids), ack=ack).start()
        self.started.append(cabinets)
        for machine_id in machine_ids:
            _wait_online(self.shop, machine_id)
        return cabinets

    def close(self) -> None:
        for cabinets in self.started:
            cabinets.stop()


@pytest.fixture
def bench(module_shop: Shop, module_broker: str) -> Iterator[Bench]:
    running = Bench(module_shop, module_broker, Topics(MODULE_PREFIX))
    try:
        yield running
    finally:
        running.close()


# --- scenario 1: duplicate webhooks -------------------------------------------------------

PURCHASES = 500
CABINETS = 10
# Sessions that also get a second, distinct event (another id, same session).
TWINS = 100
SENDERS = 50


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_500_purchases_with_duplicate_concurrent_webhooks(
    database: str, module_broker: str, tmp_path: Path
) -> None:
    """Scenario 1: 500 paid purchases on 10 cabinets; each `checkout.session.completed`
    is POSTed 1 to 5 times (seeded, shuffled, freshly signed, to both webhook paths) from 50
    threads at once; 100 of the sessions also get a second event under another id
    (`async_payment_succeeded`, signed), so both dedupes work: the inbox's on the event
    id and the purchase's UNIQUE session id. Every delivery gets 200, exactly one per
    event is new (600), the intake records 500 `created` and 100 `duplicate`, and there
    are exactly 500 purchases, 500 grants, and on the cabinets exactly the credits paid
    for, each creditId applied once.

    The fake cabinets ack: a purchase is only finished when its credits are on a cabinet,
    and that end — not just the rows — is what a duplicate must not double."""
    prefix = f"test/{uuid.uuid4().hex[:8]}/machine"
    if database == "sqlite":
        shop = Shop(f"sqlite:///{tmp_path / 'insertcoin.db'}", module_broker, prefix, shared=True)
        try:
            _duplicate_webhooks(shop, module_broker, Topics(prefix))
        finally:
            shop.stop()
    else:
        with postgres_schema() as url:
            shop = Shop(url, module_broker, prefix, shared=True)
            try:
                _duplicate_webhooks(shop, module_broker, Topics(prefix))
            finally:
                shop.stop()


def _duplicate_webhooks(shop: Shop, broker_url: str, topics: Topics) -> None:
    rng = random.Random(20240501)
    machine_ids = [f"dup{i}" for i in range(CABINETS)]
    for machine_id in machine_ids:
        add_cabinet(shop.admin, machine_id)
    cabinets = FakeCabinets(broker_url, topics, machine_ids).start()
    try:
        for machine_id in machine_ids:
            _wait_online(shop, machine_id)
        shop.standin.standin.pause_webhooks(True)
        wanted = [(machine_ids[i % CABINETS], rng.randint(1, 3)) for i in range(PURCHASES)]

        def buy(order: tuple[str, int]) -> tuple[str, str, int]:
            machine_id, quantity = order
            return machine_id, shop.buy(machine_id, quantity), quantity

        with ThreadPoolExecutor(8) as pool:
            bought = list(pool.map(buy, wanted))
        session_machine = {session: machine for machine, session, _ in bought}
        assert len(session_machine) == PURCHASES
        assert _sessions_opened(shop) == PURCHASES

        events = _events(shop, set(session_machine), COMPLETED)
        assert len(events) == PURCHASES
        assert {e["data"]["object"]["id"] for e in events} == set(session_machine)
        events += [
            _crafted("checkout.session.async_payment_succeeded", e["data"]["object"])
            for e in rng.sample(events, TWINS)
        ]
        deliveries = [
            (event, rng.choice(PATHS)) for event in events for _ in range(rng.randint(1, 5))
        ]
        rng.shuffle(deliveries)
        copies = Counter(event["id"] for event, _ in deliveries)
        assert set(copies.values()) == {1, 2, 3, 4, 5}

        local = threading.local()
        clients: list[httpx.Client] = []
        lock = threading.Lock()

        def send(delivery: tuple[dict[str, Any], str]) -> tuple[str, int, Any]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=shop.server.url, timeout=60)
                with lock:
                    clients.append(local.client)
            event, path = delivery
            response = _deliver_with(local.client, event, path)
            answer = response.json() if response.status_code == 200 else response.text
            return event["id"], response.status_code, answer

        try:
            with ThreadPoolExecutor(SENDERS) as pool:
                answers = list(pool.map(send, deliveries))
        finally:
            for client in clients:
                client.close()

        statuses = Counter(status for _, status, _ in answers)
        assert statuses == {200: len(deliveries)}, statuses
        new = Counter(event_id for event_id, _, answer in answers if not answer["duplicate"])
        assert len(new) == PURCHASES + TWINS
        assert set(new.values()) == {1}
        assert sum(1 for *_, answer in answers if answer["duplicate"]) == (
            len(deliveries) - PURCHASES - TWINS
        )

        _wait(
            lambda: len(_purchases(shop, *machine_ids)) == PURCHASES,
            "500 purchases",
            timeout=120,
        )
        _wait(
            lambda: _processed_results(shop, [e["id"] for e in events]).total() == len(events),
            "every event processed",
            timeout=60,
        )
        bought_rows = _purchases(shop, *machine_ids)
        assert len(bought_rows) == PURCHASES
        assert {row["checkout_session_id"] for row in bought_rows} == set(session_machine)
        assert {row["state"] for row in bought_rows} <= {"authorized", "credited"}
        assert all(
            row["machine_id"] == session_machine[row["checkout_session_id"]] for row in bought_rows
        )
        granted = _grants(shop, *machine_ids)
        assert len(granted) == PURCHASES
        assert {g["credit_id"] for g in granted} == {row["credit_id"] for row in bought_rows}
        results = _processed_results(shop, [e["id"] for e in events])
        assert results == {"created": PURCHASES, "duplicate": TWINS}

        expected = Counter[str]()
        for machine_id, _, quantity in bought:
            expected[machine_id] += quantity
        assert cabinets.wait_for(lambda c: len(c.applied) == PURCHASES, timeout=60)
        assert cabinets.credits == expected
        assert sum(cabinets.applied.values()) == sum(q for *_, q in bought)
        assert len(_grants(shop, *machine_ids)) == PURCHASES
    finally:
        cabinets.stop()


def _deliver_with(client: httpx.Client, event: dict[str, Any], path: str) -> httpx.Response:
    body = _body(event)
    return _post(client, path, body, _sign(body))


# --- scenario 2: several events for one purchase ------------------------------------------


def test_delayed_payment_and_all_its_events_make_one_purchase(bench: Bench) -> None:
    """Scenario 2, bank transfer: `checkout.session.completed` while the payment is still
    processing records nothing; settling raises `payment_intent.succeeded` and
    `checkout.session.async_payment_succeeded`, which make the purchase. Resending every
    event three times, a late `completed` under a new id, an `async_payment_failed` and
    assorted `payment_intent.*` events: still exactly one purchase, one grant, 2 credits
    on the cabinet, and the money taken once and never refunded."""
    shop = bench.shop
    machine_id = bench.cabinet("bank")
    cabinets = bench.online(machine_id)
    session_id = shop.open_checkout(machine_id, 2)
    shop.standin.standin.pay(session_id, method="bank_transfer")

    completed = _event_of(shop, session_id, COMPLETED)
    assert completed["data"]["object"]["payment_status"] == "unpaid"
    assert _processed(shop, completed["id"])["result"] == "ignored"
    assert shop.purchase(session_id) is None
    assert _grants(shop, machine_id) == []

    shop.standin.standin.settle_async(session_id, True)
    purchase = shop.wait_state(session_id, {"credited"})
    assert cabinets.wait_for(lambda c: c.credits[machine_id] == 2)
    intent_id = purchase["paymentIntentId"]
    own = _events(shop, {session_id, intent_id})
    assert sorted(e["type"] for e in own) == sorted(
        [COMPLETED, "payment_intent.succeeded", "checkout.session.async_payment_succeeded"]
    )

    for _ in range(3):
        for event in own:
            shop.standin.standin.resend(event["id"])
    session_now = shop.stripe.v1.checkout.sessions.retrieve(session_id).to_dict()
    intent_now = shop.stripe.v1.payment_intents.retrieve(intent_id).to_dict()
    late_completed = _crafted(COMPLETED, session_now)
    failed = _crafted("checkout.session.async_payment_failed", session_now)
    for event in (late_completed, failed):
        for path in PATHS:
            response = _deliver(shop, event, path)
            assert response.status_code == 200, response.text
    for kind in (
        "payment_intent.processing",
        "payment_intent.succeeded",
        "payment_intent.amount_capturable_updated",
        "payment_intent.payment_failed",
    ):
        for path in PATHS:
            response = _deliver(shop, _crafted(kind, intent_now), path)
            assert response.status_code == 200
            assert response.json()["ignored"] == kind

    for event in own:
        _wait(functools.partial(_delivered_times, shop, event["id"], 4), event["type"])
    assert _processed(shop, late_completed["id"])["result"] == "duplicate"
    assert _processed(shop, failed["id"])["result"] == "no payment"

    assert len(_purchases(shop, machine_id)) == 1
    [grant] = _grants(shop, machine_id)
    assert grant["credits"] == 2
    assert grant["state"] == "applied"
    assert cabinets.credits[machine_id] == 2
    assert list(cabinets.applied) == [grant["credit_id"]]
    final = shop.purchase(session_id)
    assert final is not None
    assert final["state"] == "credited"
    assert [h["event"] for h in final["history"]].count("created") == 1
    intent = shop.payment_intent(intent_id)
    assert intent.status == "succeeded"
    assert intent.amount_received == 200
    refunds = shop.stripe.v1.refunds.list(params={"payment_intent": intent_id})
    assert refunds.data == []


def test_card_payment_with_repeated_intent_events_grants_once(bench: Bench) -> None:
    """Scenario 2, card: the `completed` event and `payment_intent.amount_capturable_updated`
    each resent three times by Stripe, plus 20 concurrent freshly signed copies of
    `completed` on both paths: one purchase, one grant, one credit, captured once."""
    shop = bench.shop
    machine_id = bench.cabinet("card")
    cabinets = bench.online(machine_id)
    session_id = shop.buy(machine_id, 1)
    purchase = shop.wait_state(session_id, {"credited"})
    intent_id = purchase["paymentIntentId"]
    own = _events(shop, {session_id, intent_id})
    kinds = Counter(e["type"] for e in own)
    assert kinds == {
        COMPLETED: 1,
        "payment_intent.amount_capturable_updated": 1,
        "payment_intent.succeeded": 1,  # the capture
    }
    for _ in range(3):
        for event in own:
            shop.standin.standin.resend(event["id"])
    completed = next(e for e in own if e["type"] == COMPLETED)

    def send(index: int) -> httpx.Response:
        with httpx.Client(base_url=shop.server.url, timeout=30) as client:
            return _deliver_with(client, completed, PATHS[index % 2])

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(send, range(20)))
    assert [(a.status_code, a.json()["duplicate"]) for a in answers] == [(200, True)] * 20
    for event in own:
        _wait(functools.partial(_delivered_times, shop, event["id"], 4), event["type"])

    assert len(_purchases(shop, machine_id)) == 1
    assert len(_grants(shop, machine_id)) == 1
    assert cabinets.credits[machine_id] == 1
    assert len(cabinets.applied) == 1
    final = shop.purchase(session_id)
    assert final is not None
    assert final["state"] == "credited"
    assert [h["event"] for h in final["history"]].count("credited") == 1
    assert shop.payment_intent(intent_id).amount_received == 100


# --- scenario 8: signature attacks --------------------------------------------------------


def test_signature_attacks_have_no_effect(bench: Bench) -> None:
    """Scenario 8 on both webhook paths: a tampered body under another body's valid
    signature, the wrong secret, no header, malformed headers and a signature 301 s old
    are all refused with 400 and store nothing, while 299 s still passes (so it is the
    age that refuses). The genuine event then makes one purchase; replaying it (same id,
    fresh signature; and the identical request) answers 200 `duplicate` and adds
    nothing: 1 inbox row, 1 purchase, 1 grant, 1 credit."""
    shop = bench.shop
    machine_id = bench.cabinet("sig")
    cabinets = bench.online(machine_id)
    standin = shop.standin.standin
    standin.pause_webhooks(True)
    try:
        session_id = shop.buy(machine_id, 1)
        event = _event_of(shop, session_id, COMPLETED)
        body = _body(event)
        tampered_event = json.loads(body)
        tampered_event["data"]["object"]["metadata"]["machine_id"] = "someone-else"
        tampered_event["data"]["object"]["amount_total"] = 1
        tampered = _body(tampered_event)
        other = _body(_crafted(COMPLETED, {"id": "cs_test_" + secrets.token_hex(20)}))
        now = int(time.time())
        valid_hex = _sign(body).split("v1=")[1]
        attacks: dict[str, tuple[bytes, str | None]] = {
            "tampered body, signature of the original": (tampered, _sign(body)),
            "another body, signature of the original": (other, _sign(body)),
            "wrong secret": (body, _sign(body, secret="whsec_not_the_right_one")),
            "missing header": (body, None),
            "empty header": (body, ""),
            "garbage header": (body, "garbage"),
            "no timestamp": (body, f"v1={valid_hex}"),
            "timestamp not a number": (body, f"t=soon,v1={valid_hex}"),
            "no v1 signature": (body, f"t={now},v0={valid_hex}"),
            "v1 of the wrong length": (body, f"t={now},v1=abcdef"),
            "signature for another timestamp": (body, f"t={now - 5},v1={valid_hex}"),
            "301 s old": (body, _sign(body, at=now - 301)),
            "an hour old": (body, _sign(body, at=now - 3600)),
        }
        for path in PATHS:
            for name, (payload, header) in attacks.items():
                response = _post(shop.http, path, payload, header)
                assert response.status_code == 400, (path, name, response.text)
                assert response.json()["detail"], (path, name)
        assert _inbox(shop, event["id"]) is None
        assert _inbox_rows_about(shop, session_id) == 0
        assert shop.purchase(session_id) is None
        assert _grants(shop, machine_id) == []

        # Just inside the tolerance is accepted: an unknown type, so it has no effect.
        harmless = _body(_crafted("customer.created", {"id": "cus_1"}))
        for path in PATHS:
            response = _post(shop.http, path, harmless, _sign(harmless, at=int(time.time()) - 299))
            assert response.status_code == 200
            assert response.json()["ignored"] == "customer.created"

        genuine_header = _sign(body)
        first = _post(shop.http, "/addCredit", body, genuine_header)
        assert first.status_code == 200
        assert first.json() == {"received": True, "duplicate": False}
        shop.wait_state(session_id, {"credited"})
        replays = [_post(shop.http, path, body, _sign(body)) for path in PATHS]
        replays += [_post(shop.http, path, body, genuine_header) for path in PATHS]
        assert [(r.status_code, r.json()["duplicate"]) for r in replays] == [(200, True)] * 4
    finally:
        standin.pause_webhooks(False)
    # Stripe's own (late) delivery of the same event is one more replay.
    _wait(lambda: _delivered(shop, event["id"]) >= 1, "the stand-in's delivery")
    assert _inbox_rows_about(shop, session_id) == 1
    assert _processed(shop, event["id"])["attempts"] == 1
    assert len(_purchases(shop, machine_id)) == 1
    assert len(_grants(shop, machine_id)) == 1
    assert cabinets.credits[machine_id] == 1
    assert len(cabinets.applied) == 1


# --- free-game attempts -------------------------------------------------------------------


def test_unpaid_expired_checkout_gives_no_credit(bench: Bench) -> None:
    """No payment, no game: a checkout opened and left to expire raises
    `checkout.session.expired` (processed as "no payment"); a forged `completed` event for
    it, properly signed, is re-read from Stripe and ignored; paying it afterwards is
    refused by Stripe. 0 purchases, 0 grants, no coinpulse — while a real purchase right
    after on the same cabinet does arrive (so nothing was merely late)."""
    shop = bench.shop
    machine_id = bench.cabinet("unpaid")
    cabinets = bench.online(machine_id)
    session_id = shop.open_checkout(machine_id, 3)
    shop.stripe.v1.checkout.sessions.expire(session_id)
    expired = _event_of(shop, session_id, "checkout.session.expired")
    assert _processed(shop, expired["id"])["result"] == "no payment"

    lie = expired["data"]["object"] | {"status": "complete", "payment_status": "paid"}
    forged = _crafted(COMPLETED, lie)
    response = _deliver(shop, forged, "/addCredit")
    assert response.status_code == 200
    assert response.json()["duplicate"] is False
    assert _processed(shop, forged["id"])["result"] == "ignored"
    with pytest.raises(CheckoutError):
        shop.standin.standin.pay(session_id)
    page = shop.http.get(f"/pay/{machine_id}/done", params={"session_id": session_id})
    assert page.status_code == 200
    assert 'data-phase="waiting"' in page.text

    assert shop.purchase(session_id) is None
    assert _grants(shop, machine_id) == []
    sentinel = shop.buy(machine_id, 1)
    shop.wait_state(sentinel, {"credited"})
    assert cabinets.wait_for(lambda c: c.credits[machine_id] == 1)
    assert len(cabinets.received) == 1
    assert len(_grants(shop, machine_id)) == 1


def test_forged_session_id_is_not_found_and_credits_nothing(bench: Bench) -> None:
    """An event signed with the right secret (a leaked secret, or a confused sender) that
    names a Checkout Session Stripe does not know: acknowledged, re-read from Stripe, found
    missing ("not in Stripe"), no purchase, no grant, no coinpulse — for `completed` and
    `async_payment_succeeded` alike."""
    shop = bench.shop
    machine_id = bench.cabinet("forged")
    cabinets = bench.online(machine_id)
    forged_ids = []
    for kind in (COMPLETED, "checkout.session.async_payment_succeeded"):
        forged_session = "cs_test_forged" + secrets.token_hex(16)
        forged_ids.append(forged_session)
        event = _crafted(
            kind,
            {
                "id": forged_session,
                "object": "checkout.session",
                "status": "complete",
                "payment_status": "paid",
                "amount_total": 100,
                "currency": "usd",
                "client_reference_id": machine_id,
                "metadata": {"machine_id": machine_id},
                "payment_intent": "pi_forged" + secrets.token_hex(8),
            },
        )
        for path in PATHS:
            response = _deliver(shop, event, path)
            assert response.status_code == 200, response.text
        assert _processed(shop, event["id"])["result"].startswith("not in Stripe")
        page = shop.http.get(f"/pay/{machine_id}/status", params={"session_id": forged_session})
        assert page.json()["phase"] == "waiting"
    for forged_session in forged_ids:
        assert shop.purchase(forged_session) is None
    assert _purchases(shop, machine_id) == []
    assert _grants(shop, machine_id) == []
    sentinel = shop.buy(machine_id, 1)
    shop.wait_state(sentinel, {"credited"})
    assert cabinets.wait_for(lambda c: c.credits[machine_id] == 1)
    assert len(cabinets.received) == 1


def test_session_paid_for_one_cabinet_never_credits_another(bench: Bench) -> None:
    """A session paid for cabinet A credits A only: B's success page and status for A's
    session show nothing ("waiting"); a signed event rewritten to name B (same session)
    is a duplicate of A's purchase; a session whose metadata says B but whose
    client_reference_id says A is held as `needs_attention` without a grant. A has its
    2 credits, B none, B received no coinpulse."""
    shop = bench.shop
    a, b = bench.cabinet("crossA"), bench.cabinet("crossB")
    cabinets = bench.online(a, b)
    session_a = shop.buy(a, 2)
    shop.wait_state(session_a, {"credited"})
    assert cabinets.wait_for(lambda c: c.credits[a] == 2)

    page_b = shop.http.get(f"/pay/{b}/done", params={"session_id": session_a})
    assert page_b.status_code == 200
    assert 'data-phase="waiting"' in page_b.text
    assert "delivered" not in page_b.text.split("<script>")[0]
    status_b = shop.http.get(f"/pay/{b}/status", params={"session_id": session_a}).json()
    assert status_b["phase"] == "waiting"
    status_a = shop.http.get(f"/pay/{a}/status", params={"session_id": session_a}).json()
    assert status_a["phase"] == "delivered"

    rewritten = _event_of(shop, session_a, COMPLETED)
    rewritten["id"] = f"evt_test_{secrets.token_hex(12)}"
    rewritten["data"]["object"]["metadata"]["machine_id"] = b
    rewritten["data"]["object"]["client_reference_id"] = b
    for path in PATHS:
        assert _deliver(shop, rewritten, path).status_code == 200
    assert _processed(shop, rewritten["id"])["result"] == "duplicate"

    mixed = _direct_session(shop, machine_id=b, unit_amount=100, client_reference_id=a)
    shop.standin.standin.pay(mixed)
    held = shop.wait_state(mixed, {"needs_attention"})
    assert held["creditId"] is None
    assert "client_reference_id" in held["attentionReason"]

    assert [p["checkout_session_id"] for p in _purchases(shop, a)] == [session_a]
    assert len(_grants(shop, a)) == 1
    assert _grants(shop, b) == []
    assert cabinets.credits == {a: 2}
    assert len(cabinets.received) == 1


def test_client_cannot_choose_quantity_or_price(bench: Bench) -> None:
    """The player's URL cannot set the terms: `?quantity=999&amount=1` opens a session of
    the cabinet's maxQuantity (4) at its own price (1.00), the hosted page refuses 999,
    `quantity=0`/`-5` mean 1. A Checkout Session made directly in Stripe for this cabinet
    at half price, or for more than maxQuantity, is held as `needs_attention`, no grant.
    The only credits are the 4 paid at the right price."""
    shop = bench.shop
    machine_id = bench.cabinet("terms")
    response = shop.admin.patch(f"/api/cabinets/{machine_id}", json={"maxQuantity": 4})
    assert response.status_code == 200, response.text
    cabinets = bench.online(machine_id)

    response = shop.http.get(
        f"/pay/{machine_id}",
        params={"quantity": "999", "amount": "1", "unit_amount": "1", "price": "1"},
    )
    session_id = _session_id_of(response)
    session = shop.stripe.v1.checkout.sessions.retrieve(
        session_id, params={"expand": ["line_items"]}
    )
    [item] = session.line_items.data  # type: ignore[union-attr]
    assert (item.quantity, item.price.unit_amount, session.amount_total) == (4, 100, 400)  # type: ignore[union-attr]
    for low in ("0", "-5"):
        small = _session_id_of(shop.http.get(f"/pay/{machine_id}", params={"quantity": low}))
        assert shop.stripe.v1.checkout.sessions.retrieve(small).amount_total == 100
    with pytest.raises(CheckoutError):
        shop.standin.standin.pay(session_id, quantity=999)
    shop.standin.standin.pay(session_id)
    paid = shop.wait_state(session_id, {"credited"})
    assert (paid["credits"], paid["amount"], paid["quantity"]) == (4, 400, 4)

    cheap = _direct_session(shop, machine_id=machine_id, unit_amount=50)
    shop.standin.standin.pay(cheap)
    held = shop.wait_state(cheap, {"needs_attention"})
    assert "unit price" in held["attentionReason"]
    assert held["creditId"] is None
    bulk = _direct_session(shop, machine_id=machine_id, unit_amount=100, quantity=20)
    shop.standin.standin.pay(bulk)
    held = shop.wait_state(bulk, {"needs_attention"})
    assert "quantity 20" in held["attentionReason"]
    assert held["creditId"] is None

    assert cabinets.wait_for(lambda c: c.credits[machine_id] == 4)
    [grant] = _grants(shop, machine_id)
    assert grant["credits"] == 4
    assert len(cabinets.received) == 1


def test_reloading_the_success_page_does_not_credit_again(bench: Bench) -> None:
    """The success page and its /status JSON, loaded 100 times each after a purchase of
    3 credits: every load says "delivered", and there is still exactly one purchase, one
    grant and 3 credits on the cabinet."""
    shop = bench.shop
    machine_id = bench.cabinet("reload")
    cabinets = bench.online(machine_id)
    session_id = shop.buy(machine_id, 3)
    shop.wait_state(session_id, {"credited"})
    assert cabinets.wait_for(lambda c: c.credits[machine_id] == 3)
    for _ in range(100):
        page = shop.http.get(f"/pay/{machine_id}/done", params={"session_id": session_id})
        assert page.status_code == 200
        assert 'data-phase="delivered"' in page.text
        status = shop.http.get(f"/pay/{machine_id}/status", params={"session_id": session_id})
        assert status.status_code == 200
        assert status.json()["phase"] == "delivered"
    assert len(_purchases(shop, machine_id)) == 1
    assert len(_grants(shop, machine_id)) == 1
    assert cabinets.credits[machine_id] == 3
    assert len(cabinets.received) == 1


# --- bad input ----------------------------------------------------------------------------


def test_bad_webhook_bodies_are_refused_without_effect(bench: Bench) -> None:
    """Correctly signed but unusable bodies — not JSON, a JSON array or string, missing
    id/type/data/session id/created, wrong types — get 400 on both paths; an unknown event
    type gets 200 `ignored`; a body over 64 KiB gets 413, declared or chunked. None of
    them leaves an inbox row, and the server keeps serving."""
    shop = bench.shop
    session = {"id": "cs_test_" + secrets.token_hex(20), "object": "checkout.session"}
    ids: list[str] = []

    def event(**fields: Any) -> bytes:
        base = _crafted(COMPLETED, session)
        ids.append(base["id"])
        base.update(fields)
        return _body({k: v for k, v in base.items() if v is not _MISSING})

    refused = {
        "not JSON": (b"this is not json", "body is not JSON"),
        "truncated JSON": (b'{"id": "evt_1", "type":', "body is not JSON"),
        "JSON array": (b"[1, 2, 3]", "not a JSON object"),
        "JSON string": (b'"checkout.session.completed"', "not a JSON object"),
        "JSON null": (b"null", "not a JSON object"),
        "empty object": (b"{}", "has no id"),
        "no id": (event(id=_MISSING), "has no id"),
        "empty id": (event(id=""), "has no id"),
        "id not a string": (event(id=12345), "has no id"),
        "id too long": (event(id="evt_" + "x" * 300), "has no id"),
        "no type": (event(type=_MISSING), "has no type"),
        "type not a string": (event(type=["checkout.session.completed"]), "has no type"),
        "no data": (event(data=_MISSING), "no Checkout Session id"),
        "data not an object": (event(data="cs_test_abc"), "no Checkout Session id"),
        "no object": (event(data={}), "no Checkout Session id"),
        "object without id": (
            event(data={"object": {"object": "checkout.session"}}),
            "no Checkout Session id",
        ),
        "object id not a session": (
            event(data={"object": {"id": "pi_123"}}),
            "no Checkout Session id",
        ),
        "no created": (event(created=_MISSING), "no created time"),
        "created not a number": (event(created="1700000000"), "no created time"),
        "created a boolean": (event(created=True), "no created time"),
    }
    for path in PATHS:
        for name, (body, why) in refused.items():
            response = _post(shop.http, path, body, _sign(body))
            assert response.status_code == 400, (path, name, response.status_code, response.text)
            assert why in response.json()["detail"], (path, name, response.text)

        unknown = _crafted("customer.subscription.created", {"id": "sub_1"})
        ids.append(unknown["id"])
        response = _deliver(shop, unknown, path)
        assert response.status_code == 200
        assert response.json() == {"received": True, "ignored": "customer.subscription.created"}

        huge_event = _crafted(COMPLETED, session | {"padding": "x" * (MAX_BODY_BYTES + 1)})
        ids.append(huge_event["id"])
        huge = _body(huge_event)
        response = _post(shop.http, path, huge, _sign(huge))
        assert response.status_code == 413, response.text

        def chunks(data: bytes = huge) -> Iterator[bytes]:
            for start in range(0, len(data), 8192):
                yield data[start : start + 8192]

        response = shop.http.post(
            path,
            content=chunks(),
            headers={"Content-Type": "application/json", "Stripe-Signature": _sign(huge)},
        )
        assert response.status_code == 413, response.text

    assert [i for i in ids if _inbox(shop, i) is not None] == []
    assert _inbox_rows_about(shop, session["id"]) == 0
    assert shop.http.get("/status").status_code == 200


def test_webhook_edge_input_is_a_400_not_a_crash(bench: Bench) -> None:
    """G9 at the edges of the parsers: a body that is not UTF-8 (with a signature, with
    a wrong one, with none), a `Stripe-Signature` with non-ASCII bytes, and a signed
    event whose `created` does not fit a 64-bit column are bad input like any other:
    400 with a reason on both paths, never a 500, nothing stored. Each request on a new
    connection, so one answer cannot spoil the next."""
    shop = bench.shop
    not_utf8 = b'{"id": "evt_\xff\xfe", "type": "checkout.session.completed"}'
    body = _body(_crafted(COMPLETED, {"id": "cs_test_" + secrets.token_hex(20)}))
    now = int(time.time())
    too_late = _crafted(COMPLETED, {"id": "cs_test_" + secrets.token_hex(20)})
    too_late["created"] = 2**63
    late_body = _body(too_late)
    cases: dict[str, tuple[bytes, str | bytes | None]] = {
        "body not UTF-8, with a signature": (not_utf8, _sign(not_utf8.decode("latin-1"))),
        "body not UTF-8, garbage signature": (not_utf8, f"t={now},v1={'0' * 64}"),
        "body not UTF-8, no signature": (not_utf8, None),
        "non-ASCII signature": (body, f"t={now},v1=\u00e9\u00e9".encode("latin-1")),
        "non-ASCII timestamp": (body, f"t=\u00e9,v1={'0' * 64}".encode("latin-1")),
        "created = 2**63, signed": (late_body, _sign(late_body)),
    }
    answers = {}
    for path in PATHS:
        for name, (payload, header) in cases.items():
            with httpx.Client(base_url=shop.server.url, timeout=10) as client:
                response = _post(client, path, payload, header)
            answers[path, name] = response.status_code
            if response.status_code == 400:
                assert response.json()["detail"]
    assert answers == dict.fromkeys(answers, 400), answers
    assert _inbox(shop, too_late["id"]) is None
    assert shop.http.get("/status").status_code == 200


class _Missing:
    pass


_MISSING: Any = _Missing()


def _assert_not_charged(response: httpx.Response, status: int, why: str) -> None:
    assert response.status_code == status, response.text
    assert "location" not in response.headers
    assert "<p class=ok id=charged>You have not been charged.</p>" in response.text
    assert why in response.text, response.text


def test_pay_refuses_unknown_disabled_and_offline_cabinets_without_a_session(
    bench: Bench,
) -> None:
    """`/pay` for an unknown cabinet (404), a disabled one (409), one that never came
    online and one whose agent published online:false (409): each gets a page saying why
    and "You have not been charged", and Stripe gets no Checkout Session — none at all."""
    shop = bench.shop
    disabled, never, gone = bench.cabinet("off"), bench.cabinet("never"), bench.cabinet("gone")
    cabinets = bench.online(disabled, gone)
    assert shop.admin.patch(f"/api/cabinets/{disabled}", json={"enabled": False}).status_code == 200
    cabinets.publish_status(gone, online=False)
    _wait_online(shop, gone, online=False)
    before = _sessions_opened(shop)

    _assert_not_charged(shop.http.get("/pay/nosuch-cabinet"), 404, "no cabinet called")
    _assert_not_charged(
        shop.http.get(f"/pay/{disabled}", params={"quantity": 2}), 409, "not taking payments"
    )
    _assert_not_charged(shop.http.get(f"/pay/{never}"), 409, "is offline right now")
    _assert_not_charged(shop.http.get(f"/pay/{gone}"), 409, "is offline right now")

    assert _sessions_opened(shop) == before
    assert _checkout_rows(shop, disabled, never, gone) == 0
    # The same cabinet back online is payable again: it was the state that refused.
    cabinets.publish_status(gone, online=True)
    _wait_online(shop, gone)
    assert shop.http.get(f"/pay/{gone}").status_code == 303
    assert _sessions_opened(shop) == before + 1


def test_pay_quantity_garbage_never_crashes(bench: Bench) -> None:
    """Whatever the `quantity` query says, `/pay` answers with a checkout of 1..maxQuantity
    (303) or a clear 4xx, never a 500: letters, signs, decimals, empty, huge numbers and
    Unicode digits (superscript two, fullwidth one, Arabic-Indic three)."""
    shop = bench.shop
    machine_id = bench.cabinet("qty")
    bench.online(machine_id)
    answers = {}
    for quantity in (
        "abc",
        "-1",
        "1.5",
        "",
        " 2",
        "1e3",
        "99999999999999999999",
        "\u00b2",
        "\uff11",
        "\u0663",
    ):
        with httpx.Client(base_url=shop.server.url, timeout=10) as client:
            response = client.get(f"/pay/{machine_id}", params={"quantity": quantity})
        answers[quantity] = response.status_code
        if response.status_code == 303:
            amount = shop.stripe.v1.checkout.sessions.retrieve(
                _session_id_of(response)
            ).amount_total
            assert amount is not None
            assert 100 <= amount <= 1000, (quantity, amount)
    refused = {q: status for q, status in answers.items() if status != 303}
    assert all(400 <= status < 500 for status in refused.values()), answers


def test_pay_rate_limits_cap_the_sessions_opened(module_broker: str, tmp_path: Path) -> None:
    """With 0.06 scans a minute allowed (a burst of 3) per client and per cabinet: 20
    concurrent scans from one client open exactly 3 sessions, the other 17 get a 429
    page ("You have not been charged", Retry-After); that client is refused on another
    cabinet too; 20 other clients are refused on the exhausted cabinet; one of them,
    with tokens left, gets through on a third cabinet. Stripe holds exactly as many
    sessions as there were 303s: 4, not the 46 asked for. (Clients are told apart by
    their source address: 127.0.0.x, all loopback on Linux.)"""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here")
    prefix = f"test/{uuid.uuid4().hex[:8]}/machine"
    shop = Shop(
        f"sqlite:///{tmp_path / 'insertcoin.db'}",
        module_broker,
        prefix,
        shared=True,
        pay_rate_per_client=0.06,
        pay_rate_per_cabinet=0.06,
    )
    cabinets: FakeCabinets | None = None
    clients: dict[str, httpx.Client] = {}

    def client(address: str) -> httpx.Client:
        if address not in clients:
            clients[address] = httpx.Client(
                base_url=shop.server.url,
                timeout=30,
                transport=httpx.HTTPTransport(local_address=address),
            )
        return clients[address]

    try:
        for machine_id in ("rlA", "rlB", "rlC"):
            add_cabinet(shop.admin, machine_id)
        cabinets = FakeCabinets(module_broker, Topics(prefix), ["rlA", "rlB", "rlC"]).start()
        for machine_id in ("rlA", "rlB", "rlC"):
            _wait_online(shop, machine_id)
        flooder = client("127.0.0.2")
        with ThreadPoolExecutor(10) as pool:
            flood = list(pool.map(lambda _: flooder.get("/pay/rlA"), range(20)))
        assert Counter(r.status_code for r in flood) == {303: 3, 429: 17}
        for response in flood:
            if response.status_code == 429:
                _assert_not_charged(response, 429, "Too many tries")
                assert response.headers["retry-after"] == "60"
        assert _sessions_opened(shop) == 3

        other_cabinet = [flooder.get("/pay/rlB") for _ in range(5)]
        assert [r.status_code for r in other_cabinet] == [429] * 5
        crowd = [client(f"127.0.0.{i}").get("/pay/rlA") for i in range(3, 23)]
        assert [r.status_code for r in crowd] == [429] * 20
        assert _sessions_opened(shop) == 3

        fresh = client("127.0.0.3").get("/pay/rlC")
        assert fresh.status_code == 303
        assert _sessions_opened(shop) == 4
        assert _checkout_rows(shop, "rlA", "rlB", "rlC") == 4
    finally:
        for http in clients.values():
            http.close()
        if cabinets is not None:
            cabinets.stop()
        shop.stop()
