"""Money follows delivery (PROTOCOL §3, GUARANTEES G2/G3/G7/G8): what happens to the
player's payment when the cabinet is away, rejects, acks too late, or Stripe fails; the
reconciler; manual refunds; the operator's view of purchases; payment settings.

Everything runs against the real server and the Stripe stand-in over HTTP (real SDK,
signed webhooks). The scenarios of GUARANTEES §5 and §7 run on every database x broker;
the rest share one shop (SQLite + embedded broker) to keep the suite quick.
"""

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from insertcoin.protocol import Topics
from insertcoin.server.errors import ConfigError
from insertcoin.server.payments.gateway import StripeGateway
from insertcoin.server.settings import load_settings
from insertcoin.server.store.tables import purchases as purchases_table
from tests.conftest import BrokerUnderTest
from tests.support.cabinet import FakeCabinets
from tests.support.payments import Shop
from tests.support.server import add_cabinet
from tests.support.services import embedded_broker
from tests.support.standin import API_KEY, WEBHOOK_SECRET

TTL = 2.0  # a grant's life in these tests: short, so "offline past the grant's life" is quick
GRACE = 0.5
MODULE_TTL = 3.0  # the shared shop: long enough to act on a pending purchase


# --- helpers ----------------------------------------------------------------------------


def _wait(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_online(shop: Shop, machine_id: str, online: bool = True) -> None:
    _wait(
        lambda: shop.server.runtime.registry.get(machine_id).online == online,
        f"{machine_id} online={online}",
    )


@contextmanager
def _cabinets(
    shop: Shop, broker_url: str, topics: Topics, *ids: str, **options: Any
) -> Iterator[FakeCabinets]:
    """Fake cabinets connected and seen online by the server; disconnected afterwards."""
    cabinets = FakeCabinets(broker_url, topics, list(ids), **options).start()
    try:
        for machine_id in ids:
            _wait_online(shop, machine_id)
        yield cabinets
    finally:
        cabinets.stop()


def _go_offline(shop: Shop, cabinets: FakeCabinets, machine_id: str) -> None:
    """The cabinet says it is offline (as its Last Will would), then disconnects."""
    cabinets.publish_status(machine_id, online=False)
    _wait_online(shop, machine_id, online=False)
    cabinets.stop()


def _checkout_then_offline(
    shop: Shop, broker_url: str, topics: Topics, machine_id: str, *, client_id: str | None = None
) -> str:
    """The player scans while the cabinet is online; the cabinet then goes away before any
    coinpulse. With `client_id` the cabinet keeps a persistent session, so the broker
    queues the grant for its return. Returns the Checkout Session id (not yet paid)."""
    cabinets = FakeCabinets(
        broker_url, topics, [machine_id], client_id=client_id, persistent=client_id is not None
    ).start()
    try:
        _wait_online(shop, machine_id)
        session_id = shop.open_checkout(machine_id)
    finally:
        _go_offline(shop, cabinets, machine_id)
    return session_id


def _voided_offline(
    shop: Shop, broker_url: str, topics: Topics, machine_id: str, *, client_id: str | None = None
) -> dict[str, Any]:
    """A card purchase paid while its cabinet is away, left until its grant expired."""
    session_id = _checkout_then_offline(shop, broker_url, topics, machine_id, client_id=client_id)
    shop.standin.standin.pay(session_id)
    authorized = shop.wait_state(session_id, {"authorized", "voided"})
    assert authorized["creditId"] is not None
    return shop.wait_state(session_id, {"voided"}, timeout=TTL + MODULE_TTL + 15)


def _events_of(shop: Shop, intent_id: str, kind: str) -> list[dict[str, Any]]:
    """The stand-in's events of one type about one PaymentIntent."""
    page = shop.stripe.v1.events.list(params={"type": kind, "limit": 100})
    found = [event.to_dict() for event in page.auto_paging_iter()]
    return [event for event in found if event["data"]["object"]["id"] == intent_id]


def _refunds(shop: Shop, intent_id: str) -> list[Any]:
    return list(shop.stripe.v1.refunds.list(params={"payment_intent": intent_id, "limit": 100}))


def _history(purchase: dict[str, Any]) -> list[str]:
    return [entry["event"] for entry in purchase["history"]]


def _grant(shop: Shop, credit_id: str) -> dict[str, Any]:
    response = shop.admin.get(f"/api/grants/{credit_id}")
    assert response.status_code == 200, response.text
    grant: dict[str, Any] = response.json()
    return grant


def _metrics(shop: Shop) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = shop.http.get("/metrics")
    assert response.status_code == 200
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _failing(shop: Shop) -> float:
    return _metrics(shop)[("insertcoin_stripe_calls_failing", ())]


def _never_charged(shop: Shop, purchase: dict[str, Any]) -> None:
    """The authorization was canceled: nothing captured, nothing to refund."""
    intent = shop.payment_intent(purchase["paymentIntentId"])
    assert intent.status == "canceled"
    assert intent.amount_received == 0
    assert _events_of(shop, intent.id, "payment_intent.succeeded") == []
    assert _refunds(shop, intent.id) == []


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


# --- GUARANTEES §5 and §7, on every database x broker -----------------------------------


@pytest.fixture
def short_shop(db_url: str, broker: BrokerUnderTest, prefix: str) -> Iterator[Shop]:
    """A shop whose grants live `TTL` seconds (+ `GRACE`)."""
    running = Shop(
        db_url,
        broker.url,
        prefix,
        shared=broker.shared_subscriptions,
        credit_ttl_seconds=TTL,
        credit_grace_seconds=GRACE,
    )
    try:
        yield running
    finally:
        running.stop()


def test_cabinet_offline_past_the_grants_life_voids_and_adds_nothing_later(
    short_shop: Shop, broker: BrokerUnderTest, topics: Topics
) -> None:
    """GUARANTEES scenario 5. The cabinet is online when the player scans, then goes away
    before the coinpulse: once the grant's life is over the authorization is canceled
    (purchase `voided`, PaymentIntent `canceled`, never captured). When the cabinet comes
    back on its persistent session, the queued (expired) coinpulse adds no credit: the
    cabinet rejects it, and the grant stays `expired`."""
    shop = short_shop
    add_cabinet(shop.admin, "away1")
    client_id = f"away1-{uuid.uuid4().hex[:8]}"
    purchase = _voided_offline(shop, broker.url, topics, "away1", client_id=client_id)

    _never_charged(shop, purchase)
    assert purchase["grantState"] == "expired"
    assert purchase["pendingAction"] is None
    events = _history(purchase)
    assert events[0] == "created"
    assert "cancel_owed" in events
    assert events[-1] == "voided"
    assert "credited" not in events
    assert "refunded" not in events

    credit_id = purchase["creditId"]
    returned = FakeCabinets(broker.url, topics, ["away1"], client_id=client_id).start()
    try:
        _wait_online(shop, "away1")
        if broker.shared_subscriptions:  # Mosquitto keeps the persistent session's queue
            assert returned.wait_for(lambda c: c.received[credit_id] >= 1), "queue lost"
        if returned.wait_for(lambda c: c.received[credit_id] >= 1, timeout=1.5):
            assert returned.rejected[credit_id] == "expired"
            _wait(
                lambda: "ack_rejected_ignored" in _history(_grant(shop, credit_id)),
                "the server to record the cabinet's rejection",
            )
        assert returned.credits["away1"] == 0
        assert credit_id not in returned.applied
    finally:
        returned.stop()
    assert _grant(shop, credit_id)["state"] == "expired"
    after = shop.purchase(purchase["checkoutSessionId"])
    assert after is not None
    assert after["state"] == "voided"
    _never_charged(shop, after)


def test_late_applied_ack_after_void_needs_attention_and_is_never_also_refunded(
    short_shop: Shop, broker: BrokerUnderTest, topics: Topics
) -> None:
    """GUARANTEES scenario 7. A purchase voided because its grant expired, then the
    cabinet says `applied` after all: the purchase turns `needs_attention` with a reason,
    the PaymentIntent stays canceled, no refund is made, and its history never shows it
    both credited and refunded."""
    shop = short_shop
    add_cabinet(shop.admin, "late1")
    purchase = _voided_offline(shop, broker.url, topics, "late1")
    credit_id = purchase["creditId"]

    with _cabinets(shop, broker.url, topics, "late1", ack=False, persistent=False) as cabinet:
        cabinet.send_ack("late1", credit_id, "applied")
        late = shop.wait_state(purchase["checkoutSessionId"], {"needs_attention"})
    assert late["attentionReason"]
    assert "voided" in late["attentionReason"]
    assert late["grantState"] == "applied"
    assert "applied_late" in _history(_grant(shop, credit_id))
    time.sleep(0.5)  # a few dispatcher and settlement periods: nothing more may happen
    final = shop.purchase(purchase["checkoutSessionId"])
    assert final is not None
    assert final["state"] == "needs_attention"
    assert final["pendingAction"] is None
    _never_charged(shop, final)
    events = _history(final)
    assert "voided" in events
    assert events[-1] == "needs_attention"
    assert not ("credited" in events and "refunded" in events)
    assert "credited" not in events
    assert "refunded" not in events


# --- one shared shop for the rest --------------------------------------------------------


class ModuleShop:
    def __init__(self, shop: Shop, broker_url: str, topics: Topics, db_path: Path) -> None:
        self.shop = shop
        self.broker_url = broker_url
        self.topics = topics
        self.db_path = db_path
        self.started = time.monotonic()

    def cabinets(self, *ids: str, **options: Any) -> Any:
        for machine_id in ids:
            add_cabinet(self.shop.admin, machine_id)
        return _cabinets(self.shop, self.broker_url, self.topics, *ids, **options)


@pytest.fixture(scope="module")
def ms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleShop]:
    db_path = tmp_path_factory.mktemp("money") / "insertcoin.db"
    prefix = f"test/{uuid.uuid4().hex[:8]}/machine"
    with embedded_broker() as broker_url:
        shop = Shop(
            f"sqlite:///{db_path}",
            broker_url,
            prefix,
            shared=False,
            credit_ttl_seconds=MODULE_TTL,
            credit_grace_seconds=GRACE,
        )
        try:
            yield ModuleShop(shop, broker_url, Topics(prefix), db_path)
        finally:
            shop.stop()


def test_rejected_grant_cancels_the_authorization(ms: ModuleShop) -> None:
    """A cabinet that answers `rejected` (e.g. its coin mech jammed): the purchase ends
    `voided` and the PaymentIntent `canceled`, never captured."""
    shop = ms.shop
    with ms.cabinets("rej1", ack=False, persistent=False) as cabinet:
        session_id = shop.buy("rej1")
        purchase = shop.wait_state(session_id, {"authorized"})
        credit_id = purchase["creditId"]
        assert cabinet.wait_for(lambda c: c.received[credit_id] >= 1)
        cabinet.send_ack("rej1", credit_id, "rejected", "coin mech jammed")
        voided = shop.wait_state(session_id, {"voided"})
    assert voided["grantState"] == "rejected"
    _never_charged(shop, voided)
    assert "cancel_owed" in _history(voided)


def test_automatically_captured_payment_whose_grant_expires_is_refunded(ms: ModuleShop) -> None:
    """A bank transfer is captured by Stripe at payment (no authorization to cancel): when
    its grant expires undelivered the purchase ends `refunded`, with exactly one Refund of
    the full amount on Stripe, and never `credited`."""
    shop = ms.shop
    add_cabinet(shop.admin, "bank1")
    session_id = _checkout_then_offline(shop, ms.broker_url, ms.topics, "bank1")
    shop.standin.standin.pay(session_id, method="bank_transfer")
    assert shop.purchase(session_id) is None  # processing: nothing is paid yet
    shop.standin.standin.settle_async(session_id, True)
    refunded = shop.wait_state(session_id, {"refunded", "credited", "voided"}, timeout=20)
    assert refunded["state"] == "refunded"
    assert refunded["grantState"] == "expired"
    intent = shop.payment_intent(refunded["paymentIntentId"])
    assert intent.status == "succeeded"
    assert intent.amount_received == 100
    [refund] = _refunds(shop, intent.id)
    assert refund.amount == 100
    assert refund.status == "succeeded"
    events = _history(refunded)
    assert "refund_owed" in events
    assert "credited" not in events


def test_refund_that_failed_before_a_late_applied_ack_is_not_finished(ms: ModuleShop) -> None:
    """A bank transfer whose grant expired undelivered owes a refund; Stripe fails it
    (no effect) and then the cabinet says `applied` after all. The refund is not retried:
    the server asks Stripe whether any attempt went through, finds none, and keeps the
    money (`credited`, no Refund), since the player did get the game."""
    shop = ms.shop
    standin = shop.standin.standin
    add_cabinet(shop.admin, "keep1")
    session_id = _checkout_then_offline(shop, ms.broker_url, ms.topics, "keep1")
    standin.faults.add("POST", "/v1/refunds", status=500, count=1000)
    try:
        shop.standin.standin.pay(session_id, method="bank_transfer")
        shop.standin.standin.settle_async(session_id, True)
        _wait(
            lambda: "refund_failed" in _history(shop.purchase(session_id) or {"history": []}),
            "a refund attempt that Stripe failed",
            timeout=MODULE_TTL + GRACE + 15,
        )
        purchase = shop.purchase(session_id)
        assert purchase is not None
        with _cabinets(shop, ms.broker_url, ms.topics, "keep1", ack=False, persistent=False) as c:
            c.send_ack("keep1", purchase["creditId"], "applied")
            _wait(
                lambda: _grant(shop, purchase["creditId"])["state"] == "applied",
                "the late ack to be recorded",
            )
    finally:
        _heal(shop, "/v1/refunds")
    kept = shop.wait_state(session_id, {"credited", "refunded", "needs_attention"}, timeout=20)
    assert kept["state"] == "credited", kept
    intent = shop.payment_intent(kept["paymentIntentId"])
    assert intent.status == "succeeded"
    assert intent.amount_received == 100
    assert _refunds(shop, intent.id) == []
    events = _history(kept)
    assert events.index("refund_failed") < events.index("keep_owed") < events.index("credited")
    assert "refunded" not in events


# --- settlement faults -------------------------------------------------------------------


def _heal(shop: Shop, path: str) -> None:
    """Drop what remains of the faults injected on `path`."""
    shop.standin.standin.faults.clear(path)


@contextmanager
def _short_stripe_timeout(shop: Shop, seconds: float) -> Iterator[None]:
    """The settlement worker's Stripe client with a short timeout, for this test only: the
    module's shop keeps the default INSERTCOIN_STRIPE_TIMEOUT_SECONDS (20 s), so the test
    swaps the worker's gateway for one built the same way with a shorter timeout."""
    settlement = shop.server.runtime.payments.settlement
    original = settlement._gateway
    settlement._gateway = StripeGateway(API_KEY, api_base=shop.standin.url, timeout=seconds)
    try:
        yield
    finally:
        settlement._gateway = original


@pytest.mark.parametrize("fault", ["before", "after", "delay"])
def test_capture_faults_end_credited_with_one_capture(ms: ModuleShop, fault: str) -> None:
    """Stripe answers the capture with a 500 before acting, a 500 after acting, or so late
    the client gives up (after acting): whatever the fault, the purchase ends `credited`
    with exactly one capture of the full amount (one `payment_intent.succeeded`), and a
    500 that left no effect is on the purchase's record as a failed attempt."""
    shop = ms.shop
    machine_id = _unique("cf")
    standin = shop.standin.standin
    with ms.cabinets(machine_id) as cabinet:
        if fault == "delay":
            standin.faults.add("POST", "/capture", delay=2.5)
            with _short_stripe_timeout(shop, 1.0):
                session_id = shop.buy(machine_id)
                purchase = shop.wait_state(session_id, {"credited", "needs_attention"})
            time.sleep(2.0)  # let the late answer arrive before other tests run
        else:
            standin.faults.add("POST", "/capture", status=500, count=2, when=fault)
            session_id = shop.buy(machine_id)
            purchase = shop.wait_state(session_id, {"credited", "needs_attention"})
        assert cabinet.credits[machine_id] == 1
    _heal(shop, "/capture")
    assert purchase["state"] == "credited"
    intent = shop.payment_intent(purchase["paymentIntentId"])
    assert intent.status == "succeeded"
    assert intent.amount_received == 100
    assert len(_events_of(shop, intent.id, "payment_intent.succeeded")) == 1
    assert _refunds(shop, intent.id) == []
    events = _history(purchase)
    if fault == "before":
        assert events.count("capture_failed") == 2
        failures = [e for e in purchase["history"] if e["event"] == "capture_failed"]
        assert all("500" in str(e["detail"]) or "injected" in str(e["detail"]) for e in failures)
    assert events[-1] == "credited"
    assert events.count("credited") == 1


@pytest.mark.parametrize("fault", ["after", "delay"])
def test_capture_answered_with_an_error_after_acting_is_on_record(
    ms: ModuleShop, fault: str
) -> None:
    """G8 (every step recorded): when the capture took effect but its answer was a 500 or
    never came, the purchase's history still tells the operator that the call failed and
    was found done on re-reading the payment, not only that it was credited."""
    shop = ms.shop
    machine_id = _unique("cr")
    standin = shop.standin.standin
    with ms.cabinets(machine_id):
        if fault == "delay":
            standin.faults.add("POST", "/capture", delay=2.5)
            with _short_stripe_timeout(shop, 1.0):
                session_id = shop.buy(machine_id)
                purchase = shop.wait_state(session_id, {"credited", "needs_attention"})
            time.sleep(2.0)
        else:
            standin.faults.add("POST", "/capture", status=500, count=1, when="after")
            session_id = shop.buy(machine_id)
            purchase = shop.wait_state(session_id, {"credited", "needs_attention"})
    _heal(shop, "/capture")
    assert purchase["state"] == "credited"
    assert any(
        event.endswith("_failed")
        or any(
            word in str(entry["detail"] or "").lower()
            for word in ("500", "error", "timeout", "timed out", "injected")
        )
        for entry in purchase["history"]
        for event in [entry["event"]]
    ), f"no trace of the failed capture in {purchase['history']}"


def test_failing_capture_shows_in_metrics_until_it_heals(ms: ModuleShop) -> None:
    """While Stripe keeps failing the capture, `insertcoin_stripe_calls_failing` is 1 and
    the purchase shows its pending action and error; once Stripe answers again the capture
    is made once and the gauge returns to 0."""
    shop = ms.shop
    machine_id = _unique("mf")
    assert _failing(shop) == 0
    shop.standin.standin.faults.add("POST", "/capture", status=500, count=300)
    try:
        with ms.cabinets(machine_id):
            session_id = shop.buy(machine_id)
            _wait(lambda: _failing(shop) == 1, "insertcoin_stripe_calls_failing to be 1")
            stuck = shop.purchase(session_id)
            assert stuck is not None
            assert stuck["state"] == "authorized"
            assert stuck["pendingAction"] == "capture"
            assert stuck["actionError"]
            assert stuck["grantState"] == "applied"
    finally:
        _heal(shop, "/capture")
    purchase = shop.wait_state(session_id, {"credited", "needs_attention"}, timeout=90)
    assert purchase["state"] == "credited"
    _wait(lambda: _failing(shop) == 0, "insertcoin_stripe_calls_failing back to 0")
    assert _history(purchase).count("capture_failed") >= 1
    intent = shop.payment_intent(purchase["paymentIntentId"])
    assert intent.amount_received == 100
    assert len(_events_of(shop, intent.id, "payment_intent.succeeded")) == 1


@pytest.mark.parametrize("when", ["before", "after"])
def test_cancel_faults_end_voided_with_one_cancel(ms: ModuleShop, when: str) -> None:
    """A rejected grant whose cancel Stripe answers with a 500 (before or after acting):
    the purchase still ends `voided`, the PaymentIntent is canceled exactly once, never
    captured, and a 500 without effect shows as failed attempts in the history."""
    shop = ms.shop
    machine_id = _unique("xf")
    with ms.cabinets(machine_id, ack=False, persistent=False) as cabinet:
        session_id = shop.buy(machine_id)
        purchase = shop.wait_state(session_id, {"authorized"})
        credit_id = purchase["creditId"]
        assert cabinet.wait_for(lambda c: c.received[credit_id] >= 1)
        shop.standin.standin.faults.add("POST", "/cancel", status=500, count=2, when=when)
        cabinet.send_ack(machine_id, credit_id, "rejected", "out of order")
        voided = shop.wait_state(session_id, {"voided", "needs_attention", "refunded"})
    _heal(shop, "/cancel")
    assert voided["state"] == "voided"
    _never_charged(shop, voided)
    assert len(_events_of(shop, voided["paymentIntentId"], "payment_intent.canceled")) == 1
    if when == "before":
        assert _history(voided).count("cancel_failed") == 2
    assert _history(voided).count("voided") == 1


# --- the reconciler ----------------------------------------------------------------------


def _missed_purchase(ms: ModuleShop, machine_id: str) -> str:
    """A paid session whose webhooks were all lost: returns its id, with no purchase."""
    shop = ms.shop
    standin = shop.standin.standin
    # A card payment raises two events: payment_intent.amount_capturable_updated, then
    # checkout.session.completed. Both are lost.
    standin.drop_next_webhooks(2)
    session_id = shop.buy(machine_id)
    time.sleep(1.0)
    assert shop.purchase(session_id) is None
    delivered = {d["event"] for d in standin.deliveries()}
    page = shop.stripe.v1.events.list(params={"type": "checkout.session.completed", "limit": 100})
    completed = [
        e.id for e in page.auto_paging_iter() if e.to_dict()["data"]["object"]["id"] == session_id
    ]
    assert len(completed) == 1
    assert completed[0] not in delivered
    return session_id


def test_reconciler_records_a_purchase_whose_webhook_was_lost(ms: ModuleShop) -> None:
    """A `checkout.session.completed` that never arrived: no purchase, until the
    reconciler pages through Stripe's events; then the purchase is recorded, its grant
    delivered and captured (`credited`). A second run records nothing new."""
    shop = ms.shop
    # The periodic reconcile runs 5 s after start: let it pass, so this one is ours.
    time.sleep(max(0.0, ms.started + 6 - time.monotonic()))
    intake = shop.server.runtime.payments.intake
    with ms.cabinets("rec1") as cabinet:
        session_id = _missed_purchase(ms, "rec1")
        assert intake.reconcile() == 1
        purchase = shop.wait_state(session_id, {"credited", "needs_attention"})
        assert purchase["state"] == "credited"
        assert cabinet.wait_for(lambda c: c.credits["rec1"] == 1)
    assert intake.reconcile() == 0
    assert shop.payment_intent(purchase["paymentIntentId"]).amount_received == 100


def test_reconcile_command_records_missed_purchases_once(ms: ModuleShop, tmp_path: Path) -> None:
    """`insertcoin payments reconcile`, run by an operator against the same database and
    Stripe: it reports the one missed event, the running server then delivers and captures
    the purchase; a second run reports 0 and records nothing."""
    shop = ms.shop
    time.sleep(max(0.0, ms.started + 6 - time.monotonic()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSERTCOIN_", "STRIPE_"))}
    env |= {
        "INSERTCOIN_DATABASE_URL": f"sqlite:///{ms.db_path}",
        "INSERTCOIN_STRIPE_API_KEY": API_KEY,
        "INSERTCOIN_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "INSERTCOIN_STRIPE_API_BASE": shop.standin.url,
    }

    def reconcile() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "insertcoin", "payments", "reconcile"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    with ms.cabinets("rec2") as cabinet:
        session_id = _missed_purchase(ms, "rec2")
        out = reconcile()
        assert "(stripe-test): 1 missed event(s) recorded" in out, out
        purchase = shop.wait_state(session_id, {"credited", "needs_attention"})
        assert purchase["state"] == "credited"
        assert cabinet.wait_for(lambda c: c.credits["rec2"] == 1)
        with shop.server.runtime.db.read() as conn:
            before = conn.execute(select(func.count()).select_from(purchases_table)).scalar()
        out = reconcile()
        assert "(stripe-test): 0 missed event(s) recorded" in out, out
        with shop.server.runtime.db.read() as conn:
            after = conn.execute(select(func.count()).select_from(purchases_table)).scalar()
        assert after == before
        assert cabinet.credits["rec2"] == 1


# --- manual refunds ----------------------------------------------------------------------


def _refund(shop: Shop, purchase_id: str, client: httpx.Client | None = None) -> httpx.Response:
    return (client or shop.admin).post(f"/api/purchases/{purchase_id}/refund")


def test_manual_refund_of_a_credited_purchase_refunds_once(ms: ModuleShop) -> None:
    """The operator refunds a credited purchase: 202, it ends `refunded` with exactly one
    Refund of the full amount on Stripe; asking again, or 5 times at once on another
    purchase, still makes exactly one Refund each."""
    shop = ms.shop
    with ms.cabinets("rf1"):
        first = shop.wait_state(shop.buy("rf1"), {"credited"})
        second = shop.wait_state(shop.buy("rf1"), {"credited"})

    response = _refund(shop, first["id"])
    assert response.status_code == 202, response.text
    assert response.json()["id"] == first["id"]
    refunded = shop.wait_state(first["checkoutSessionId"], {"refunded"})
    assert "refund_requested" in _history(refunded)
    assert _refund(shop, first["id"]).status_code == 202
    time.sleep(0.5)
    [refund] = _refunds(shop, first["paymentIntentId"])
    assert refund.amount == 100

    clients = [
        httpx.Client(base_url=shop.server.url, headers=dict(shop.admin.headers), timeout=10)
        for _ in range(5)
    ]
    try:
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda c: _refund(shop, second["id"], c), clients))
    finally:
        for client in clients:
            client.close()
    assert [a.status_code for a in answers] == [202] * 5, [a.text for a in answers]
    again = shop.wait_state(second["checkoutSessionId"], {"refunded"})
    time.sleep(0.5)
    assert len(_refunds(shop, second["paymentIntentId"])) == 1
    assert _history(again).count("refund_requested") == 1
    assert _history(again).count("refunded") == 1
    for done in (refunded, again):
        intent = shop.payment_intent(done["paymentIntentId"])
        assert intent.status == "succeeded"
        assert intent.amount_received == 100


def test_manual_refund_refuses_what_it_cannot_do(ms: ModuleShop) -> None:
    """Refund while the credits are still being delivered → 409 (the payment is released by
    itself if they are not); unknown purchase → 404; malformed id → 422; without the admin
    token → 401, with a wrong one → 401. None of them touches Stripe."""
    shop = ms.shop
    with ms.cabinets("rf2", ack=False, persistent=False) as cabinet:
        session_id = shop.buy("rf2")
        pending = shop.wait_state(session_id, {"authorized"})
        assert pending["grantState"] == "pending"
        response = _refund(shop, pending["id"])
        assert response.status_code == 409, response.text
        assert "detail" in response.json()
        cabinet.send_ack("rf2", pending["creditId"], "rejected", "test over")
        voided = shop.wait_state(session_id, {"voided"})
    assert "refund_requested" not in _history(voided)
    assert _refunds(shop, voided["paymentIntentId"]) == []

    assert _refund(shop, "pu_" + "0" * 24).status_code == 404
    assert _refund(shop, "not-a-purchase").status_code == 422
    assert shop.http.post(f"/api/purchases/{voided['id']}/refund").status_code == 401
    wrong = shop.http.post(
        f"/api/purchases/{voided['id']}/refund", headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401


def test_manual_refund_of_needs_attention_gives_the_money_back(ms: ModuleShop) -> None:
    """Two purchases the operator must decide on, refunded by hand: a late ack after a void
    (authorization already canceled) stays uncharged and ends `voided`; a session whose
    price does not match the cabinet's (held, never granted) has its authorization
    canceled and ends `voided`. No Refund object, nothing captured."""
    shop = ms.shop
    add_cabinet(shop.admin, "na1")
    voided = _voided_offline(shop, ms.broker_url, ms.topics, "na1")
    with _cabinets(shop, ms.broker_url, ms.topics, "na1", ack=False, persistent=False) as cab:
        cab.send_ack("na1", voided["creditId"], "applied")
        late = shop.wait_state(voided["checkoutSessionId"], {"needs_attention"})
    assert _refund(shop, late["id"]).status_code == 202
    released = shop.wait_state(late["checkoutSessionId"], {"voided", "refunded"})
    assert released["state"] == "voided"
    _never_charged(shop, released)

    # A session the server never opened, at 2.50 for a cabinet that costs 1.00.
    add_cabinet(shop.admin, "na2")
    session = shop.stripe.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "line_items": [
                {
                    "price_data": {
                        "currency": "usd",
                        "unit_amount": 250,
                        "product_data": {"name": "1 credit"},
                    },
                    "quantity": 1,
                }
            ],
            "client_reference_id": "na2",
            "metadata": {"machine_id": "na2"},
            "payment_intent_data": {"metadata": {"machine_id": "na2"}},
            "payment_method_options": {"card": {"capture_method": "manual"}},
            "success_url": "https://example.com/ok",
        }
    )
    shop.standin.standin.pay(session.id)
    held = shop.wait_state(session.id, {"needs_attention"})
    assert held["creditId"] is None
    assert "250" in held["attentionReason"]
    assert shop.payment_intent(held["paymentIntentId"]).status == "requires_capture"
    assert _refund(shop, held["id"]).status_code == 202
    released = shop.wait_state(session.id, {"voided", "refunded"})
    assert released["state"] == "voided"
    _never_charged(shop, released)


# --- the operator's view -----------------------------------------------------------------


def test_purchase_list_filters_and_pages(ms: ModuleShop) -> None:
    """`GET /api/purchases` filters by cabinet, state and creation time, pages with
    `before` + `limit`, newest first, and refuses bad filters with a 4xx."""
    shop = ms.shop
    with ms.cabinets("lf1", "lf2", ack=False, persistent=False) as cabinet:

        def buy(machine_id: str, result: str) -> dict[str, Any]:
            session_id = shop.buy(machine_id)
            pending = shop.wait_state(session_id, {"authorized"})
            assert cabinet.wait_for(lambda c: c.received[pending["creditId"]] >= 1)
            cabinet.send_ack(machine_id, pending["creditId"], result)
            return shop.wait_state(session_id, {"credited" if result == "applied" else "voided"})

        a1 = buy("lf1", "applied")
        time.sleep(0.01)
        mark = datetime.now(UTC)
        time.sleep(0.01)
        a2 = buy("lf1", "applied")
        a3 = buy("lf1", "applied")
        b1 = buy("lf2", "applied")
        b2 = buy("lf2", "rejected")

    def listed(**params: Any) -> list[dict[str, Any]]:
        response = shop.admin.get("/api/purchases", params=params)
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()
        return found

    assert [p["id"] for p in listed(machineId="lf1")] == [a3["id"], a2["id"], a1["id"]]
    assert [p["id"] for p in listed(machineId="lf2", state="voided")] == [b2["id"]]
    assert [p["id"] for p in listed(machineId="lf2", state="credited")] == [b1["id"]]
    assert listed(machineId="lf1", state="voided") == []
    since = mark.isoformat().replace("+00:00", "Z")
    assert [p["id"] for p in listed(machineId="lf1", since=since)] == [a3["id"], a2["id"]]
    page1 = listed(machineId="lf1", limit=2)
    page2 = listed(machineId="lf1", limit=2, before=page1[-1]["id"])
    assert [p["id"] for p in page1 + page2] == [a3["id"], a2["id"], a1["id"]]
    assert listed(machineId="lf1", before=a1["id"]) == []
    every = listed(limit=500)
    assert {a1["id"], a2["id"], a3["id"], b1["id"], b2["id"]} <= {p["id"] for p in every}
    assert all(p["state"] == "credited" for p in listed(state="credited", limit=500))
    view = listed(machineId="lf2", state="voided")[0]
    assert view["amount"] == 100
    assert view["currency"] == "usd"
    assert view["credits"] == 1
    assert view["checkoutSessionId"] == b2["checkoutSessionId"]

    for bad in (
        {"limit": 0},
        {"limit": 501},
        {"state": "lost"},
        {"machineId": "a/b"},
        {"since": "yesterday"},
        {"before": "nope"},
    ):
        response = shop.admin.get("/api/purchases", params=bad)
        assert response.status_code == 422, (bad, response.text)
    assert shop.admin.get("/api/purchases", params={"before": "pu_" + "f" * 24}).status_code == 404
    assert shop.http.get("/api/purchases").status_code == 401


def test_metrics_and_status_agree_with_the_records(ms: ModuleShop) -> None:
    """`/metrics` counts purchases by state and sums captured revenue by currency exactly
    as the database holds them, and that revenue is what Stripe received for the credited
    purchases (none of them refunded); `/status` says `payments: stripe-test`."""
    shop = ms.shop
    with ms.cabinets("mt1"):
        for quantity in (1, 2):
            shop.wait_state(shop.buy("mt1", quantity), {"credited"})

    def from_db() -> tuple[dict[str, int], dict[str, int], list[tuple[str, int]]]:
        with shop.server.runtime.db.read() as conn:
            states = dict(
                conn.execute(
                    select(purchases_table.c.state, func.count()).group_by(purchases_table.c.state)
                ).all()
            )
            credited = [
                (row.payment_intent_id, row.amount, row.currency)
                for row in conn.execute(
                    select(purchases_table).where(purchases_table.c.state == "credited")
                )
            ]
        revenue: dict[str, int] = {}
        for _, amount, currency in credited:
            revenue[currency] = revenue.get(currency, 0) + amount
        return states, revenue, [(pi, amount) for pi, amount, _ in credited]

    def consistent() -> Any:
        before = from_db()
        values = _metrics(shop)
        after = from_db()
        return (before, values) if before == after else None

    (states, revenue, credited), values = _wait(consistent, "a quiet moment")
    for state in ("authorized", "credited", "voided", "refunded", "needs_attention"):
        key = ("insertcoin_purchases", (("state", state),))
        assert values[key] == states.get(state, 0), state
    assert states.get("credited", 0) >= 2
    assert values[("insertcoin_revenue_minor_units", (("currency", "usd"),))] == revenue["usd"]
    for intent_id, amount in credited:
        intent = shop.payment_intent(intent_id)
        assert intent.status == "succeeded"
        assert intent.amount_received == amount
        assert _refunds(shop, intent_id) == []

    status = shop.http.get("/status")
    assert status.status_code == 200
    assert status.json()["payments"] == "stripe-test"


# --- payment settings (no server) --------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No inherited settings and no `.env`: a working directory of our own."""
    for name in list(os.environ):
        if name.startswith(("INSERTCOIN_", "MQTT_", "STRIPE_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_live_key_needs_an_https_public_url(clean_env: pytest.MonkeyPatch) -> None:
    """A live Stripe key with an `http://` public URL is refused at start, naming
    INSERTCOIN_PUBLIC_URL; with `https://` it is accepted as `stripe-live`."""
    with pytest.raises(ConfigError) as caught:
        load_settings(
            stripe_api_key="sk_live_abc",
            stripe_webhook_secret="whsec_x",
            public_url="http://arcade.example.com",
        )
    assert str(caught.value).startswith("INSERTCOIN_PUBLIC_URL")
    live = load_settings(
        stripe_api_key="sk_live_abc",
        stripe_webhook_secret="whsec_x",
        public_url="https://arcade.example.com",
    )
    assert live.payments_mode == "stripe-live"


def test_key_without_webhook_secret_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    """A Stripe key without the webhook signing secret is refused, naming
    INSERTCOIN_STRIPE_WEBHOOK_SECRET (unsigned webhooks could never be verified)."""
    with pytest.raises(ConfigError) as caught:
        load_settings(stripe_api_key="sk_test_abc")
    assert str(caught.value).startswith("INSERTCOIN_STRIPE_WEBHOOK_SECRET")


def test_payments_mode_follows_the_key(clean_env: pytest.MonkeyPatch) -> None:
    """No key → simulated payments; an `sk_test_` key → `stripe-test`; the prototype's
    `STRIPE_API_KEY` / `STRIPE_WEBHOOK_SECRET` work as fallbacks, and INSERTCOIN_* wins
    over them."""
    assert load_settings().payments_mode == "simulated"
    test = load_settings(stripe_api_key="sk_test_abc", stripe_webhook_secret="whsec_x")
    assert test.payments_mode == "stripe-test"

    clean_env.setenv("STRIPE_API_KEY", "sk_test_prototype")
    clean_env.setenv("STRIPE_WEBHOOK_SECRET", "whsec_prototype")
    legacy = load_settings()
    assert legacy.payments_mode == "stripe-test"
    assert legacy.stripe_api_key is not None
    assert legacy.stripe_api_key.get_secret_value() == "sk_test_prototype"
    assert legacy.stripe_webhook_secret is not None
    assert legacy.stripe_webhook_secret.get_secret_value() == "whsec_prototype"

    clean_env.setenv("INSERTCOIN_STRIPE_API_KEY", "sk_test_new")
    preferred = load_settings().stripe_api_key
    assert preferred is not None
    assert preferred.get_secret_value() == "sk_test_new"

    clean_env.delenv("STRIPE_WEBHOOK_SECRET")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("INSERTCOIN_STRIPE_WEBHOOK_SECRET")
