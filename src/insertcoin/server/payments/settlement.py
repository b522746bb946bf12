"""Makes the Stripe calls purchases owe (capture, cancel, refund), and records what
happened. Safe to crash anywhere: the call stays owed until its effect is recorded, and
its idempotency key makes a repeat harmless.

After a 5xx or no answer, the payment is re-read before anything else is decided: Stripe
stores a 5xx under its idempotency key, so a blind retry with the same key would only
replay the error, and a retry with a new key could act twice.

A claimed batch is called concurrently (each call waits on the network) and its
outcomes are recorded in one transaction.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Connection, RowMapping

from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.payments import purchases
from insertcoin.server.payments.gateway import (
    PaymentIntent,
    StripeGateway,
    StripeRefused,
    StripeUnavailable,
)
from insertcoin.server.periodic import Periodic
from insertcoin.server.store.database import Database

log = structlog.get_logger(__name__)

_BATCH = 64
_LEASE = timedelta(seconds=60)

# What each call leaves behind when it took effect.
_DONE = {purchases.CAPTURE: "captured", purchases.CANCEL: "canceled", purchases.REFUND: "refunded"}


@dataclass(frozen=True)
class _Done:
    outcome: str  # captured | canceled | refunded
    error: Exception | None = None  # the misleading answer, when found out by a re-read


@dataclass(frozen=True)
class _Retry:
    error: str
    new_key: bool


@dataclass(frozen=True)
class _Switch:
    action: str
    why: str
    error: str


@dataclass(frozen=True)
class _GiveUp:
    reason: str
    error: str


_Result = _Done | _Retry | _Switch | _GiveUp


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
        self._callers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stripe-call")
        self._worker = Periodic("settlement", interval, self.run_once)

    def start(self) -> None:
        self._worker.start()

    def wake(self) -> None:
        self._worker.wake()

    def stop(self) -> None:
        self._worker.stop()
        self._callers.shutdown(wait=False, cancel_futures=True)

    def run_once(self) -> int:
        """Make every due call; returns how many were attempted."""
        done = 0
        while True:
            with self._db.write() as conn:
                owed = purchases.claim_owed(conn, utc_now(), _LEASE, _BATCH)
            results = list(self._callers.map(self._attempt, owed))
            with self._db.write() as conn:
                now = utc_now()
                owing = purchases.still_owing(conn, owed)
                outcomes = [
                    (owing[o.purchase_id], o, r)
                    for o, r in zip(owed, results, strict=True)
                    if o.purchase_id in owing
                ]
                logs = self._record_done(conn, outcomes, now) + [
                    self._record(conn, row, o, r, now)
                    for row, o, r in outcomes
                    if not isinstance(r, _Done)
                ]
            for event, level, fields in logs:
                getattr(log, level)(event, **fields)
            done += len(owed)
            if len(owed) < _BATCH:
                return done

    # Calling Stripe (no database here) --------------------------------------------------

    def _attempt(self, owed: purchases.Owed) -> _Result:
        try:
            return _Done(self._call(owed))
        except StripeUnavailable as exc:
            return self._after_unknown(owed, exc)
        except StripeRefused as exc:
            return self._after_refusal(owed, exc)

    def _call(self, owed: purchases.Owed) -> str:
        key, intent = owed.idempotency_key, owed.payment_intent_id
        if owed.action == purchases.RELEASE:
            return self._release(intent, key)
        if owed.action == purchases.KEEP:
            # The refund's key is not replayed: an attempt that never reached Stripe
            # would then refund credits the cabinet did give.
            return "refunded" if self._gateway.has_refund(intent) else "captured"
        call = {
            purchases.CAPTURE: self._gateway.capture,
            purchases.CANCEL: self._gateway.cancel,
            purchases.REFUND: self._gateway.refund,
        }[owed.action]
        call(intent, idempotency_key=key)
        return _DONE[owed.action]

    def _release(self, intent: str, key: str) -> str:
        """Whatever gives the money back from the state the payment is in."""
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

    def _reread(
        self, owed: purchases.Owed, exc: Exception
    ) -> tuple[PaymentIntent, str | None] | _Retry:
        try:
            intent = self._gateway.retrieve_payment_intent(owed.payment_intent_id)
            return intent, self._effect(owed, intent)
        except (StripeUnavailable, StripeRefused) as again:
            # Can't tell: retry with the same key, which replays the first answer if the
            # call did reach Stripe.
            return _Retry(f"{exc}; re-read failed: {again}", new_key=False)

    def _after_unknown(self, owed: purchases.Owed, exc: StripeUnavailable) -> _Result:
        read = self._reread(owed, exc)
        if isinstance(read, _Retry):
            return read
        _, effect = read
        if effect is not None:
            return _Done(effect, exc)
        # Not applied. A 5xx is stored under its key, so only a fresh key can act; with no
        # answer at all the same key is right (it replays whatever did happen).
        return _Retry(str(exc), new_key=exc.status is not None)

    def _after_refusal(self, owed: purchases.Owed, exc: StripeRefused) -> _Result:
        read = self._reread(owed, exc)
        if isinstance(read, _Retry):
            return read
        intent, effect = read
        if effect is not None:
            return _Done(effect, exc)
        if owed.action == purchases.CANCEL and intent.status == "succeeded":
            return _Switch(purchases.REFUND, "the payment was captured", str(exc))
        if owed.action == purchases.REFUND and intent.status == "requires_capture":
            return _Switch(purchases.CANCEL, "the payment is uncaptured", str(exc))
        if owed.action == purchases.CAPTURE and intent.status == "canceled":
            return _GiveUp("credits delivered but the authorization was canceled", str(exc))
        # The re-read shows no effect, so a fresh key cannot make it twice, and the old
        # one may hold this refusal.
        return _Retry(str(exc), new_key=True)

    # Recording (one transaction per batch) ----------------------------------------------

    def _record_done(
        self,
        conn: Connection,
        outcomes: list[tuple[RowMapping, purchases.Owed, _Result]],
        now: datetime,
    ) -> list[tuple[str, str, dict[str, object]]]:
        """Write the calls that took effect, as one batch; returns the log lines to emit
        once committed."""
        done: list[tuple[RowMapping, purchases.Owed, _Done]] = [
            (row, owed, result) for row, owed, result in outcomes if isinstance(result, _Done)
        ]
        # A call that worked although Stripe's answer said otherwise keeps that on record.
        details: list[dict[str, object] | None] = [
            None
            if result.error is None
            else {"error": str(result.error)[:500], "attempt": owed.attempts, "foundOnReRead": True}
            for _, owed, result in done
        ]
        states = purchases.settled(
            conn,
            [
                (row, result.outcome, detail)
                for (row, _, result), detail in zip(done, details, strict=True)
            ],
            now,
        )
        return [
            (
                f"purchase_{state}",
                "info" if detail is None else "warning",
                {**_fields(owed), **(detail or {})},
            )
            for (_, owed, _), detail, state in zip(done, details, states, strict=True)
        ]

    def _record(
        self,
        conn: Connection,
        row: RowMapping,
        owed: purchases.Owed,
        result: _Result,
        now: datetime,
    ) -> tuple[str, str, dict[str, object]]:
        """Write one failed call's outcome for the purchase `row` (still owing the call);
        returns the log line to emit once committed."""
        fields = _fields(owed)
        if isinstance(result, _Retry):
            delay = self._backoff(owed.attempts)
            purchases.retry_later(conn, row, owed, now, delay, result.error, new_key=result.new_key)
            return "stripe_call_failed", "warning", {**fields, "error": result.error}
        self.wake()  # the switched call, or the operator's, is due now
        if isinstance(result, _Switch):
            purchases.switch(conn, row, owed, result.action, now, result.why)
            return "stripe_call_switched", "warning", {**fields, "to": result.action}
        assert isinstance(result, _GiveUp)
        purchases.give_up(conn, row, now, result.reason)
        return "purchase_needs_attention", "warning", {**fields, "reason": result.reason}


def _fields(owed: purchases.Owed) -> dict[str, object]:
    return {"purchaseId": owed.purchase_id, "machineId": owed.machine_id, "action": owed.action}
