"""Makes the Stripe calls purchases owe (capture, cancel, refund), and records what
happened. Safe to crash anywhere: the call stays owed until its effect is recorded, and
its idempotency key makes a repeat harmless.

After a 5xx or no answer, the payment is re-read before anything else is decided: Stripe
stores a 5xx under its idempotency key, so a blind retry with the same key would only
replay the error, and a retry with a new key could act twice.
"""

import threading
from collections.abc import Callable
from datetime import timedelta

import structlog

from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.payments import purchases
from insertcoin.server.payments.gateway import (
    PaymentIntent,
    StripeGateway,
    StripeRefused,
    StripeUnavailable,
)
from insertcoin.server.store.database import Database

log = structlog.get_logger(__name__)

_BATCH = 50
_LEASE = timedelta(seconds=60)

# What each call leaves behind when it took effect.
_DONE = {purchases.CAPTURE: "captured", purchases.CANCEL: "canceled", purchases.REFUND: "refunded"}


class Settlement:
    def __init__(
        self,
        db: Database,
        gateway: StripeGateway,
        *,
        interval: float,
        backoff: Callable[[int], timedelta],
    ) -> None:
        self._db = db
        self._gateway = gateway
        self._interval = interval
        self._backoff = backoff
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="settlement", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.run_once()
            except Exception:
                log.exception("settlement_failed")

    def run_once(self) -> int:
        """Make every due call; returns how many were attempted."""
        done = 0
        while True:
            with self._db.write() as conn:
                owed = purchases.claim_owed(conn, utc_now(), _LEASE, _BATCH)
            for item in owed:
                self._make(item)
            done += len(owed)
            if len(owed) < _BATCH:
                return done

    def _make(self, owed: purchases.Owed) -> None:
        fields = {"purchaseId": owed.purchase_id, "machineId": owed.machine_id}
        try:
            outcome = self._call(owed)
        except StripeUnavailable as exc:
            self._unknown_outcome(owed, exc)
            return
        except StripeRefused as exc:
            self._refused(owed, exc)
            return
        self._settled(owed, outcome)
        log.debug("stripe_call_made", action=owed.action, **fields)

    def _call(self, owed: purchases.Owed) -> str:
        key, intent = owed.idempotency_key, owed.payment_intent_id
        if owed.action == purchases.CAPTURE:
            self._gateway.capture(intent, idempotency_key=key)
            return "captured"
        if owed.action == purchases.CANCEL:
            self._gateway.cancel(intent, idempotency_key=key)
            return "canceled"
        if owed.action == purchases.REFUND:
            self._gateway.refund(intent, idempotency_key=key)
            return "refunded"
        # release: whatever gives the money back from the state the payment is in.
        current = self._gateway.retrieve_payment_intent(intent)
        if current.status == "canceled":
            return "canceled"
        if current.status == "succeeded":
            if not self._gateway.has_refund(intent):
                self._gateway.refund(intent, idempotency_key=key)
            return "refunded"
        self._gateway.cancel(intent, idempotency_key=key)
        return "canceled"

    def _effect(self, owed: purchases.Owed, intent: PaymentIntent) -> str | None:
        """What the call left behind, judged from a fresh read of the payment."""
        if owed.action in (purchases.CAPTURE, purchases.CANCEL):
            wanted = "succeeded" if owed.action == purchases.CAPTURE else "canceled"
            return _DONE[owed.action] if intent.status == wanted else None
        if intent.status == "succeeded" and self._gateway.has_refund(intent.id):
            return "refunded"
        if owed.action == purchases.RELEASE and intent.status == "canceled":
            return "canceled"
        return None

    def _settled(self, owed: purchases.Owed, outcome: str, error: Exception | None = None) -> None:
        detail = None
        if error is not None:
            # It worked, but Stripe's answer said otherwise: keep that on record.
            detail = {"error": str(error)[:500], "attempt": owed.attempts, "foundOnReRead": True}
            log.warning(
                "stripe_call_failed_but_applied",
                action=owed.action,
                purchaseId=owed.purchase_id,
                machineId=owed.machine_id,
                error=str(error),
            )
        with self._db.write() as conn:
            state = purchases.settled(conn, owed, outcome, utc_now(), detail)
        if state is not None:
            log.info(
                f"purchase_{state}",
                purchaseId=owed.purchase_id,
                machineId=owed.machine_id,
                via=owed.action,
            )

    def _retry(self, owed: purchases.Owed, error: str, *, new_key: bool) -> None:
        with self._db.write() as conn:
            purchases.retry_later(
                conn, owed, utc_now(), self._backoff(owed.attempts), error, new_key=new_key
            )
        log.warning(
            "stripe_call_failed",
            action=owed.action,
            purchaseId=owed.purchase_id,
            machineId=owed.machine_id,
            attempt=owed.attempts,
            error=error,
        )

    def _unknown_outcome(self, owed: purchases.Owed, exc: StripeUnavailable) -> None:
        try:
            intent = self._gateway.retrieve_payment_intent(owed.payment_intent_id)
            effect = self._effect(owed, intent)
        except (StripeUnavailable, StripeRefused) as again:
            # Can't tell: retry with the same key, which replays the first answer if
            # the call did reach Stripe.
            self._retry(owed, f"{exc}; re-read failed: {again}", new_key=False)
            return
        if effect is not None:
            self._settled(owed, effect, exc)
            return
        # Not applied. A 5xx is stored under its key, so only a fresh key can act; with no
        # answer at all the same key is right (it replays whatever did happen).
        self._retry(owed, str(exc), new_key=exc.status is not None)

    def _refused(self, owed: purchases.Owed, exc: StripeRefused) -> None:
        try:
            intent = self._gateway.retrieve_payment_intent(owed.payment_intent_id)
            effect = self._effect(owed, intent)
        except (StripeUnavailable, StripeRefused) as again:
            self._retry(owed, f"{exc}; re-read failed: {again}", new_key=False)
            return
        if effect is not None:
            self._settled(owed, effect, exc)
            return
        now = utc_now()
        with self._db.write() as conn:
            if owed.action == purchases.CANCEL and intent.status == "succeeded":
                purchases.switch(conn, owed, purchases.REFUND, now, "the payment was captured")
            elif owed.action == purchases.REFUND and intent.status == "requires_capture":
                purchases.switch(conn, owed, purchases.CANCEL, now, "the payment is uncaptured")
            elif owed.action == purchases.CAPTURE and intent.status == "canceled":
                purchases.give_up(
                    conn, owed, now, "credits delivered but the authorization was canceled"
                )
            else:
                # The re-read shows no effect, so a fresh key cannot make it twice, and
                # the old one may hold this refusal.
                purchases.retry_later(
                    conn, owed, now, self._backoff(owed.attempts), str(exc), new_key=True
                )
        log.warning(
            "stripe_call_refused",
            action=owed.action,
            purchaseId=owed.purchase_id,
            machineId=owed.machine_id,
            paymentStatus=intent.status,
            error=str(exc),
        )
        self.wake()
