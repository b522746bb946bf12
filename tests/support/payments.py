"""A shop for payment tests: a real server in `stripe-test` mode whose Stripe is the
stand-in (the real SDK over real HTTP, signed webhooks), and a player who buys."""

from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select

from insertcoin.server.payments import purchases as purchase_states
from insertcoin.server.store.tables import purchases
from tests.support.server import ServerThread, make_settings
from tests.support.services import free_port
from tests.support.standin import API_KEY, WEBHOOK_SECRET, StandInThread

FINAL = frozenset(
    [
        purchase_states.CREDITED,
        purchase_states.VOIDED,
        purchase_states.REFUNDED,
        purchase_states.NEEDS_ATTENTION,
    ]
)


class Shop:
    def __init__(
        self, db_url: str, broker_url: str, prefix: str, *, shared: bool, **overrides: Any
    ) -> None:
        port = free_port()
        self.standin = StandInThread(
            f"http://127.0.0.1:{port}/webhooks/stripe",
            api_key=API_KEY,
            retry_delays=(0.2, 0.5, 1.0, 2.0, 4.0),
        )
        values: dict[str, Any] = {
            "mqtt_shared_subscriptions": shared,
            "stripe_api_key": API_KEY,
            "stripe_webhook_secret": WEBHOOK_SECRET,
            "stripe_api_base": self.standin.url,
            "public_url": f"http://127.0.0.1:{port}",
            "pay_rate_per_client": 1e6,
            "pay_rate_per_cabinet": 1e6,
            "reconcile_interval_seconds": 3600.0,
        }
        values.update(overrides)
        settings = make_settings(db_url, broker_url, prefix, **values)
        try:
            self.server = ServerThread(settings, port=port)
        except BaseException:
            self.standin.stop()
            raise
        self.http = httpx.Client(base_url=self.server.url, timeout=10)
        self.admin = self.server.admin
        self.stripe = self.standin.client()

    def stop(self) -> None:
        self.http.close()
        self.server.stop()
        self.standin.stop()

    def open_checkout(self, machine_id: str, quantity: int = 1) -> str:
        """Scan the QR: returns the Checkout Session id the server redirected to."""
        response = self.http.get(f"/pay/{machine_id}", params={"quantity": quantity})
        assert response.status_code == 303, response.text
        return urlsplit(response.headers["location"]).path.rsplit("/", 1)[-1]

    def buy(self, machine_id: str, quantity: int = 1, **pay: Any) -> str:
        """Scan and pay on the hosted checkout page; returns the session id."""
        session_id = self.open_checkout(machine_id, quantity)
        self.standin.standin.pay(session_id, **pay)
        return session_id

    def purchase(self, session_id: str) -> dict[str, Any] | None:
        with self.server.runtime.db.read() as conn:
            purchase_id = conn.execute(
                select(purchases.c.id).where(purchases.c.checkout_session_id == session_id)
            ).scalar()
        if purchase_id is None:
            return None
        response = self.admin.get(f"/api/purchases/{purchase_id}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def wait_state(
        self, session_id: str, states: frozenset[str] | set[str], timeout: float = 15.0
    ) -> dict[str, Any]:
        import time  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while True:
            found = self.purchase(session_id)
            if found is not None and found["state"] in states:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"purchase of {session_id} never reached {states}: {found}")
            time.sleep(0.05)

    def payment_intent(self, intent_id: str) -> Any:
        return self.stripe.v1.payment_intents.retrieve(intent_id)
