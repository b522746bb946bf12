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

    from insertcoin.server.payments.standin import StandIn

log = structlog.get_logger(__name__)

STANDIN_PATH = "/_stripe"
_SIMULATED_KEY = "sk_test_insertcoin_simulated"
_WARM_UP_DELAY = 3.0


def _local_stripe(settings: Settings, api_base: str, webhook_secret: str) -> "StandIn":
    from insertcoin.server.payments.standin import StandIn  # noqa: PLC0415

    return StandIn(
        public_url=api_base,
        webhook_url=settings.public_url + "/webhooks/stripe",
        webhook_secret=webhook_secret,
        api_key=_SIMULATED_KEY,
    )


class Payments:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        schedule: grants.Schedule,
        send: "Callable[[CoinPulse], None]",
    ) -> None:
        self.mode = settings.payments_mode
        self.standin: StandIn | None = None
        if self.mode == "simulated":
            # Same code path as production: the real SDK, over HTTP, to a local Stripe.
            self.webhook_secret = "whsec_" + secrets.token_hex(24)
            api_base = settings.stripe_api_base or settings.public_url + STANDIN_PATH
            self.standin = _local_stripe(settings, api_base, self.webhook_secret)
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
        # The SDK import (≈ 0.25 s of CPU) happens in the background once start-up is
        # done: started at once, it would compete with start-up for the GIL.
        self._warm_up = threading.Timer(_WARM_UP_DELAY, self.gateway.warm_up)
        self._warm_up.daemon = True
        self._inbox: GroupCommit[inbox.InboxEvent, tuple[inbox.InboxEvent, bool]] = GroupCommit(
            db, "event_inbox", self._store, after=self._stored
        )

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
        if self.standin is not None:
            self.standin.start()
        self._warm_up.start()
        self._inbox.start()
        self.intake.start()
        self.settlement.start()

    def stop(self) -> None:
        self._warm_up.cancel()
        self.settlement.stop()
        self.intake.stop()
        self._inbox.stop()
        if self.standin is not None:
            self.standin.stop()
