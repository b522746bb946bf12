"""The player's side in a real browser (Chromium, phone-sized): scan → `/pay/{id}` → the
stand-in's hosted checkout → Pay → the success page that follows the credits live, and
the pages that say "You have not been charged." when nothing was taken."""

import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import func, select

from insertcoin.protocol import Topics
from insertcoin.server.store.tables import checkouts
from tests.support.cabinet import FakeCabinets
from tests.support.payments import Shop
from tests.support.server import add_cabinet
from tests.support.services import embedded_broker, mosquitto

GOOD_CARD = "4242 4242 4242 4242"
DECLINED_CARD = "4000 0000 0000 0002"
NOT_CHARGED = "You have not been charged."
# The success page polls once a second; delivery takes a few polls at most.
LIVE = 20_000


@dataclass(frozen=True)
class Arcade:
    shop: Shop
    broker_url: str
    topics: Topics


@pytest.fixture(scope="module")
def arcade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arcade]:
    """One shop for the module: SQLite, and Mosquitto when installed (else the embedded
    broker); the storage-by-broker matrix is proven by tests/payments."""
    workdir = tmp_path_factory.mktemp("browser")
    with ExitStack() as stack:
        if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
            (workdir / "mosquitto").mkdir()
            broker_url, shared = stack.enter_context(mosquitto(workdir / "mosquitto")).url, True
        else:
            broker_url, shared = stack.enter_context(embedded_broker()), False
        prefix = f"test/{uuid.uuid4().hex[:8]}/machine"
        shop = Shop(f"sqlite:///{workdir / 'insertcoin.db'}", broker_url, prefix, shared=shared)
        stack.callback(shop.stop)
        yield Arcade(shop, broker_url, Topics(prefix))


@pytest.fixture
def cabinet(arcade: Arcade) -> Iterator[Callable[..., FakeCabinets]]:
    """Registers a cabinet and brings it online (a fake agent on the broker)."""
    started: list[FakeCabinets] = []

    def online(machine_id: str, *, ack: bool = True) -> FakeCabinets:
        add_cabinet(arcade.shop.admin, machine_id)
        cabinets = FakeCabinets(arcade.broker_url, arcade.topics, [machine_id], ack=ack)
        started.append(cabinets.start())
        _wait_presence(arcade.shop, machine_id, online=True)
        return cabinets

    yield online
    for cabinets in started:
        cabinets.stop()


def _wait_presence(shop: Shop, machine_id: str, *, online: bool) -> None:
    deadline = time.monotonic() + 10
    while shop.server.runtime.registry.get(machine_id).online is not online:
        if time.monotonic() > deadline:
            pytest.fail(f"{machine_id} never became {'online' if online else 'offline'}")
        time.sleep(0.05)


def _scan(phone: Page, shop: Shop, machine_id: str) -> str:
    """Open the QR target as a phone would; returns the Checkout Session shown."""
    response = phone.goto(f"{shop.server.url}/pay/{machine_id}")
    assert response is not None
    assert response.ok, response.status
    assert phone.url.startswith(f"{shop.standin.url}/c/pay/cs_"), phone.url
    return phone.url.rsplit("/", 1)[-1]


def _pay(phone: Page, shop: Shop, machine_id: str, session_id: str, card: str) -> None:
    """Type the card on the hosted checkout and press Pay; lands on the success page."""
    phone.fill("#card-number", card)
    phone.click("#pay")
    phone.wait_for_url(re.compile(rf"/pay/{machine_id}/done\?"))
    assert phone.url == f"{shop.server.url}/pay/{machine_id}/done?session_id={session_id}"


def _stay_here(phone: Page) -> list[str]:
    """Mark the loaded page and record any later navigation of it: a live update must
    neither reload nor leave the page."""
    phone.evaluate("window.__sameDocument = true")
    navigations: list[str] = []
    phone.on(
        "framenavigated",
        lambda frame: navigations.append(frame.url) if frame == phone.main_frame else None,
    )
    return navigations


def _checkouts_of(shop: Shop, machine_id: str) -> int:
    with shop.server.runtime.db.read() as conn:
        count: int = conn.execute(
            select(func.count()).select_from(checkouts).where(checkouts.c.machine_id == machine_id)
        ).scalar_one()
    return count


def _sessions_at_stripe(shop: Shop) -> int:
    # The stand-in has no session list endpoint (neither has Stripe, without filters that
    # would hide a stray session): count what its account holds.
    return len(shop.standin.standin._account._sessions)


def test_scan_pay_and_watch_the_credits_arrive(
    arcade: Arcade, cabinet: Callable[..., FakeCabinets], phone: Page
) -> None:
    """A phone scans an online cabinet's QR: `/pay/{id}` lands on the hosted checkout, the
    player picks 2, types 4242…, presses Pay and is sent to `/pay/{id}/done?session_id=…`.
    That page first says the payment is on its way, then — without reloading — that the
    credits were delivered to the cabinet by name; the cabinet got 2 credits and the
    purchase ends `credited`."""
    shop = arcade.shop
    cabinets = cabinet("b-paid")
    session_id = _scan(phone, shop, "b-paid")
    for field in ("#card-number", "#quantity", "#pay", "#cancel", "#error"):
        expect(phone.locator(field)).to_be_visible()
    phone.fill("#quantity", "2")
    # Hold Stripe's webhooks so the success page is seen before the payment is recorded.
    shop.standin.standin.pause_webhooks(True)
    try:
        _pay(phone, shop, "b-paid", session_id, GOOD_CARD)
        status = phone.locator("#status")
        expect(status).to_have_attribute("data-phase", re.compile(r"^(waiting|received)$"))
        navigations = _stay_here(phone)
    finally:
        shop.standin.standin.pause_webhooks(False)
    expect(status).to_have_attribute("data-phase", "delivered", timeout=LIVE)
    expect(status).to_contain_text("Credits delivered to Cabinet b-paid")
    assert phone.evaluate("window.__sameDocument") is True
    assert navigations == []
    purchase = shop.wait_state(session_id, {"credited"})
    assert purchase["credits"] == 2
    assert purchase["amount"] == 200
    assert cabinets.credits["b-paid"] == 2


def test_declined_card_then_cancel_charges_nothing(
    arcade: Arcade, cabinet: Callable[..., FakeCabinets], phone: Page
) -> None:
    """A declined card (4000 0000 0000 0002) stays on the hosted checkout with an error that
    says so and records no purchase; Cancel then leads to the cancel page, which says
    "You have not been charged"."""
    shop = arcade.shop
    cabinet("b-declined")
    session_id = _scan(phone, shop, "b-declined")
    checkout_url = phone.url
    phone.fill("#card-number", DECLINED_CARD)
    phone.click("#pay")
    expect(phone.locator("#error")).to_contain_text("declined")
    assert phone.url == checkout_url
    session = shop.stripe.v1.checkout.sessions.retrieve(session_id)
    assert session.status == "open"
    assert session.payment_status == "unpaid"
    assert shop.purchase(session_id) is None
    phone.click("#cancel")
    phone.wait_for_url(f"{shop.server.url}/pay/b-declined/cancelled")
    expect(phone.locator("#charged")).to_have_text(NOT_CHARGED)
    expect(phone.locator("h1")).to_have_text("Payment cancelled")
    assert shop.purchase(session_id) is None


def test_offline_cabinet_opens_no_checkout(
    arcade: Arcade, cabinet: Callable[..., FakeCabinets], phone: Page
) -> None:
    """Scanning a cabinet that has gone offline shows why (409, "offline") and "You have not
    been charged." on the server's own page; no Checkout Session is created."""
    shop = arcade.shop
    cabinets = cabinet("b-offline")
    cabinets.publish_status("b-offline", online=False)
    _wait_presence(shop, "b-offline", online=False)
    sessions = _sessions_at_stripe(shop)
    url = f"{shop.server.url}/pay/b-offline"
    response = phone.goto(url)
    assert response is not None
    assert response.status == 409
    assert phone.url == url
    expect(phone.locator("h1")).to_have_text("Cabinet offline")
    expect(phone.locator("main")).to_contain_text("Cabinet b-offline is offline right now.")
    expect(phone.locator("#charged")).to_have_text(NOT_CHARGED)
    assert _sessions_at_stripe(shop) == sessions
    assert _checkouts_of(shop, "b-offline") == 0


def test_rejected_grant_turns_the_success_page_to_not_charged(
    arcade: Arcade, cabinet: Callable[..., FakeCabinets], phone: Page
) -> None:
    """Paid, but the cabinet rejects the credits: the open success page goes from "sending"
    to "Not delivered: you have not been charged." by itself, and the authorization is
    cancelled (purchase `voided`)."""
    shop = arcade.shop
    cabinets = cabinet("b-rejected", ack=False)
    session_id = _scan(phone, shop, "b-rejected")
    _pay(phone, shop, "b-rejected", session_id, GOOD_CARD)
    status = phone.locator("#status")
    assert cabinets.wait_for(lambda c: len(c.received) == 1)
    credit_id = next(iter(cabinets.received))
    expect(status).to_have_attribute("data-phase", "received", timeout=LIVE)
    expect(status).to_contain_text("Payment received")
    expect(status).to_contain_text("Cabinet b-rejected")
    navigations = _stay_here(phone)
    cabinets.send_ack("b-rejected", credit_id, "rejected", "coin door open")
    expect(status).to_have_attribute("data-phase", "not_delivered", timeout=LIVE)
    expect(status).to_have_text("Not delivered: you have not been charged.")
    assert phone.evaluate("window.__sameDocument") is True
    assert navigations == []
    purchase = shop.wait_state(session_id, {"voided"})
    assert purchase["grantState"] == "rejected"
    assert shop.payment_intent(purchase["paymentIntentId"]).status == "canceled"
