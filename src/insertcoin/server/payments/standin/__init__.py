"""A local stand-in for Stripe: the subset of the REST API the product uses, a hosted
checkout page and signed webhook delivery, spoken to by the real `stripe` SDK over HTTP
(`stripe.StripeClient(key, base_addresses={"api": public_url})`).

Simulated payments mount `StandIn(...).app` on the server; tests run it on its own port or
as its own process (`python -m insertcoin.server.payments.standin`)."""

import threading
from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI

from insertcoin.server.payments.standin import checkout_page
from insertcoin.server.payments.standin import control as control_routes
from insertcoin.server.payments.standin.account import Account
from insertcoin.server.payments.standin.api import Api
from insertcoin.server.payments.standin.checkout_page import redirect_url
from insertcoin.server.payments.standin.faults import Faults
from insertcoin.server.payments.standin.idempotency import IdempotencyKeys
from insertcoin.server.payments.standin.webhooks import Webhooks

__all__ = ["StandIn"]

log = structlog.get_logger(__name__)

# Stripe retries for three days with growing gaps; the same shape, scaled down.
DEFAULT_RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)
_TICK_SECONDS = 0.05


class StandIn:
    def __init__(
        self,
        *,
        public_url: str,
        webhook_url: str | None,
        webhook_secret: str,
        api_key: str | None = None,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        async_delay: float = 3.0,
        control: bool = False,
    ) -> None:
        """`public_url`: where browsers and the SDK reach `app`; `api_key` None accepts any
        `sk_test_` key; `retry_delays`: seconds between webhook attempts; `async_delay`:
        seconds before a delayed (bank transfer) payment settles."""
        lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._webhooks = Webhooks(webhook_url, webhook_secret, retry_delays, lock, self._wake)
        self._account = Account(public_url.rstrip("/"), lock, self._webhooks.publish, async_delay)
        self.faults = Faults(lock)
        api = Api(self._account, self.faults, IdempotencyKeys(lock), api_key)
        self.app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        self.app.include_router(api.router())
        self.app.include_router(checkout_page.router(self._account))
        if control:
            self.app.include_router(control_routes.router(self))

    def start(self) -> None:
        """Start the background thread: webhook delivery and retries, delayed payments
        settling, sessions expiring."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="stripe-standin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self._account.tick()
                self._webhooks.deliver_due()
            except Exception:
                log.exception("stripe_standin_tick_failed")
            self._wake.wait(_TICK_SECONDS)

    # The control routes' operations, for tests in this process ----------------------------

    def pay(
        self,
        session_id: str,
        *,
        card: str = "4242 4242 4242 4242",
        quantity: int | None = None,
        method: str = "card",
    ) -> dict[str, Any]:
        """Submit the hosted page's form (`method` "card" or "bank_transfer"); returns
        `{"session": ..., "redirect": success URL}`. Raises `CheckoutError` when the page
        would show an error (declined card, expired session, ...)."""
        session = self._account.pay(session_id, card=card, quantity=quantity, method=method)
        return {
            "session": session,
            "redirect": redirect_url(self._account.checkout_view(session_id)),
        }

    def settle_async(self, session_id: str, succeed: bool = True) -> dict[str, Any]:
        """Settle a delayed payment now; returns the session."""
        return self._account.settle(session_id, succeed)

    def pause_webhooks(self, paused: bool = True) -> None:
        """Paused, events queue and nothing is delivered; resuming delivers them."""
        self._webhooks.pause(paused)

    def drop_next_webhooks(self, count: int) -> None:
        """The next `count` events are never delivered (still listed in `/v1/events`)."""
        self._webhooks.drop_next(count)

    def resend(self, event_id: str) -> None:
        self._webhooks.resend(self._account.event(event_id))

    def deliveries(self) -> list[dict[str, Any]]:
        """Every delivery attempt: `{"event", "type", "attempt", "status"}`; `status` is
        the receiver's HTTP status or the name of the network error."""
        return self._webhooks.deliveries()

    def advance_clock(self, seconds: float) -> None:
        """Move the stand-in's time forward (session expiry, `created` of new objects)."""
        self._account.advance_clock(seconds)
        self._wake.set()
