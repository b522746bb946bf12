"""Payments in one server process: the Stripe gateway (or, with no key, the built-in
stand-in it talks to over HTTP), the webhook inbox writer, intake, settlement, and the
hook that lets purchases follow their grants."""

import secrets
import threading
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Connection

from insertcoin.protocol.messages import CoinPulse
from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.delivery import grants
from insertcoin.server.errors import InsertcoinError
from insertcoin.server.payments import inbox, purchases
from insertcoin.server.payments.gateway import StripeGateway
from insertcoin.server.payments.intake import LEASE, Intake
from insertcoin.server.payments.settlement import Settlement
from insertcoin.server.settings import Settings
from insertcoin.server.store.database import Database
from insertcoin.server.store.group_commit import GroupCommit

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import Receive, Scope, Send

    from insertcoin.server.payments.standin import StandIn

log = structlog.get_logger(__name__)

STANDIN_PATH = "/_stripe"
_SIMULATED_KEY = "sk_test_insertcoin_simulated"
_WARM_UP_DELAY = 3.0


class Payments:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        schedule: grants.Schedule,
        send: "Callable[[CoinPulse], None]",
    ) -> None:
        self.mode = settings.payments_mode
        self._standin: StandIn | None = None
        self._standin_lock = threading.Lock()
        if self.mode == "simulated":
            # Same code path as production: the real SDK, over HTTP, to a local Stripe.
            self.webhook_secret = "whsec_" + secrets.token_hex(24)
            api_base = settings.stripe_api_base or settings.public_url + STANDIN_PATH
            self._standin_url = api_base
            self._webhook_url = settings.public_url + "/webhooks/stripe"
            self.gateway = StripeGateway(
                _SIMULATED_KEY, api_base=api_base, timeout=settings.stripe_timeout_seconds
            )
        else:
            assert settings.stripe_api_key is not None
            assert settings.stripe_webhook_secret is not None
            self.webhook_secret = settings.stripe_webhook_secret.get_secret_value()
            self.gateway = StripeGateway(
                settings.stripe_api_key.get_secret_value(),
                api_base=settings.stripe_api_base,
                timeout=settings.stripe_timeout_seconds,
            )

        def backoff(attempts: int) -> timedelta:
            initial, cap = settings.retry_initial_seconds, max(settings.retry_max_seconds, 60.0)
            return timedelta(seconds=min(initial * 2 ** (attempts - 1), cap))

        self.settlement = Settlement(
            db, self.gateway, interval=settings.dispatch_interval_seconds, backoff=backoff
        )
        self.intake = Intake(
            db,
            self.gateway,
            schedule,
            send=send,
            money_owed=self.settlement.wake,
            interval=settings.dispatch_interval_seconds,
            reconcile_interval=settings.reconcile_interval_seconds,
            backoff=backoff,
        )
        # The SDK import (≈ 0.08 s of CPU) and the local Stripe happen in the background
        # once start-up is done: started at once, they would compete with it for the GIL.
        self._warm_up = threading.Timer(_WARM_UP_DELAY, self._warm)
        self._warm_up.daemon = True
        self._inbox: GroupCommit[inbox.InboxEvent, tuple[inbox.InboxEvent, bool]] = GroupCommit(
            db, "event_inbox", self._store, after=self._stored
        )

    @property
    def standin(self) -> "StandIn | None":
        """Simulated payments' local Stripe, built and started on first use (its import
        is a tenth of the server's start-up); None with a Stripe key."""
        if self.mode != "simulated":
            return None
        with self._standin_lock:
            if self._standin is None:
                from insertcoin.server.payments.standin import StandIn  # noqa: PLC0415

                self._standin = StandIn(
                    public_url=self._standin_url,
                    webhook_url=self._webhook_url,
                    webhook_secret=self.webhook_secret,
                    api_key=_SIMULATED_KEY,
                )
                self._standin.start()
            return self._standin

    async def serve_standin(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        """The local Stripe as an ASGI app, mounted by the server in simulated mode."""
        standin = self.standin
        assert standin is not None
        await standin.app(scope, receive, send)

    def _warm(self) -> None:
        self.gateway.warm_up()
        _ = self.standin

    @staticmethod
    def _store(
        conn: Connection, events: list[inbox.InboxEvent]
    ) -> list[tuple[inbox.InboxEvent, bool] | InsertcoinError]:
        new = {e.id for e in inbox.store(conn, events, utc_now(), LEASE)}
        # A duplicate inside one batch is new only the first time.
        results: list[tuple[inbox.InboxEvent, bool] | InsertcoinError] = []
        for event in events:
            results.append((event, event.id in new))
            new.discard(event.id)
        return results

    def _stored(self, result: tuple[inbox.InboxEvent, bool]) -> None:
        event, new = result
        if new:
            self.intake.submit([event])

    def receive(self, event: inbox.InboxEvent) -> "Future[tuple[inbox.InboxEvent, bool]]":
        """Store a verified webhook event; resolves once it is durable."""
        return self._inbox.submit(event)

    # The grant follower: called by delivery inside the transaction that settled grants.
    def follow(self, conn: Connection, credit_ids: list[str], now: datetime) -> int:
        return purchases.follow_grants(conn, credit_ids, now)

    def committed(self) -> None:
        self.settlement.wake()

    def start(self) -> None:
        self._warm_up.start()
        self._inbox.start()
        self.intake.start()
        self.settlement.start()

    def stop(self) -> None:
        self._warm_up.cancel()
        self.settlement.stop()
        self.intake.stop()
        self._inbox.stop()
        with self._standin_lock:
            if self._standin is not None:
                self._standin.stop()
