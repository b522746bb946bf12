"""Turns stored Stripe events into purchases: re-read the Checkout Session from Stripe
(never trusting the webhook body), record purchase + grant in one transaction, publish
the grant once committed.

Events arrive three ways, all through the inbox: from this process's webhook route
(handed over at once, already leased to it), from an expired lease (another process
died holding it, or a retry is due), and from the reconciler, which pages through
Stripe's event list for anything the webhooks missed.
"""

import functools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import structlog
from sqlalchemy import select

from insertcoin.protocol.messages import CoinPulse
from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.delivery import grants
from insertcoin.server.payments import inbox, purchases
from insertcoin.server.payments.gateway import (
    CheckoutSession,
    StripeGateway,
    StripeRefused,
    StripeUnavailable,
)
from insertcoin.server.store.database import Database
from insertcoin.server.store.tables import meta
from insertcoin.server.store.upsert import insert_into

log = structlog.get_logger(__name__)

LEASE = timedelta(seconds=30)
_BATCH = 64
_CURSOR_KEY = "stripe_events_cursor"
# Stripe retries a webhook for three days: a first reconcile looks that far back. Later
# ones overlap the last five minutes, since an event can show up in the list late.
_FIRST_LOOKBACK = 3 * 24 * 3600
_OVERLAP = 300


class Intake:
    def __init__(
        self,
        db: Database,
        gateway: StripeGateway,
        schedule: grants.Schedule,
        *,
        send: Callable[[CoinPulse], None],
        money_owed: Callable[[], None],
        interval: float,
        reconcile_interval: float,
        backoff: Callable[[int], timedelta],
    ) -> None:
        self._db = db
        self._gateway = gateway
        self._schedule = schedule
        self._send = send
        self._money_owed = money_owed
        self._interval = interval
        self._reconcile_interval = reconcile_interval
        self._backoff = backoff
        self._queue: queue.Queue[inbox.InboxEvent | None] = queue.Queue()
        self._readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stripe-read")
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self._next_reconcile = 0.0

    def start(self) -> None:
        self._next_reconcile = time.monotonic() + self._reconcile_interval
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._readers.shutdown(wait=False, cancel_futures=True)

    def submit(self, events: list[inbox.InboxEvent]) -> None:
        """Process events this process has just stored (and so holds the lease of)."""
        for event in events:
            self._queue.put(event)

    def _run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            if time.monotonic() - last_sweep >= self._interval:
                # Also under steady load: leases of dead processes must not wait for a lull.
                last_sweep = time.monotonic()
                self._guarded(self._periodic)
            try:
                first = self._queue.get(timeout=self._interval)
            except queue.Empty:
                continue
            if first is None:
                return
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._guarded(functools.partial(self.process, batch))

    @staticmethod
    def _guarded(work: Callable[[], object]) -> None:
        try:
            work()
        except Exception:
            log.exception("intake_failed")

    def _periodic(self) -> None:
        with self._db.write() as conn:
            due = inbox.claim_due(conn, utc_now(), LEASE, _BATCH)
        if due:
            self.process(due)
        if time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + self._reconcile_interval
            try:
                self.reconcile()
            except (StripeUnavailable, StripeRefused) as exc:
                log.warning("reconcile_failed", error=str(exc))

    def _read(self, event: inbox.InboxEvent) -> CheckoutSession | Exception:
        try:
            return self._gateway.retrieve_session(event.object_id)
        except (StripeUnavailable, StripeRefused) as exc:
            return exc

    def process(self, events: list[inbox.InboxEvent]) -> None:
        """Re-read each paying event's session (in parallel), then record them all in one
        transaction and publish the new grants."""
        paying = [e for e in events if e.type in inbox.PAYING]
        # The first is read right here while reader threads take the rest: a lone event
        # (the usual case at low load) then costs no hop to another thread and back.
        others = self._readers.map(self._read, paying[1:])
        found = [self._read(paying[0]), *others] if paying else []
        reads = dict(zip([e.id for e in paying], found, strict=True))
        now = utc_now()
        recorded: list[tuple[inbox.InboxEvent, purchases.Recorded]] = []
        failed: list[tuple[inbox.InboxEvent, str]] = []
        with self._db.write() as conn:
            readable: list[tuple[inbox.InboxEvent, CheckoutSession]] = []
            done: list[tuple[str, str]] = []
            for event in events:
                read = reads.get(event.id)
                if read is None:
                    # Failed or expired sessions charge nobody: nothing to record.
                    done.append((event.id, "no payment"))
                elif isinstance(read, StripeRefused) and read.status == 404:
                    done.append((event.id, f"not in Stripe: {read}"))
                    failed.append((event, str(read)))
                elif isinstance(read, Exception):
                    inbox.retry(conn, event.id, now + self._backoff(event.attempts), str(read))
                    failed.append((event, str(read)))
                else:
                    readable.append((event, read))
            outcomes = purchases.record_many(
                conn, [s for _, s in readable], now=now, schedule=self._schedule
            )
            for (event, _), outcome in zip(readable, outcomes, strict=True):
                done.append((event.id, outcome.event))
                recorded.append((event, outcome))
            inbox.processed(conn, done, now)
        for event, error in failed:
            log.warning("stripe_event_not_processed", eventId=event.id, error=error)
        owed = False
        for event, outcome in recorded:
            self._log(event, outcome)
            if outcome.pulse is not None:
                self._send(outcome.pulse)
            owed = owed or outcome.event == "undeliverable"
        if owed:
            self._money_owed()

    @staticmethod
    def _log(event: inbox.InboxEvent, outcome: purchases.Recorded) -> None:
        fields = {
            "eventId": event.id,
            "checkoutSessionId": event.object_id,
            "purchaseId": outcome.purchase_id,
            "machineId": outcome.machine_id,
            "via": event.via,
        }
        if outcome.event == "created":
            assert outcome.pulse is not None
            log.info("purchase_authorized", **fields, creditId=outcome.pulse.credit_id)
        elif outcome.event in ("needs_attention", "undeliverable"):
            log.warning(f"purchase_{outcome.event}", **fields, reason=outcome.reason)
        elif outcome.event == "duplicate":
            log.debug("purchase_duplicate", **fields)
        else:
            log.info("stripe_event_ignored", **fields, reason=outcome.reason)

    def reconcile(self) -> int:
        """Feed every handled event since the saved cursor through the inbox; returns how
        many had not been seen."""
        with self._db.read() as conn:
            cursor = conn.execute(select(meta.c.value).where(meta.c.key == _CURSOR_KEY)).scalar()
        since = int(cursor) if cursor else int(time.time()) - _FIRST_LOOKBACK
        found = [
            inbox.InboxEvent(
                e["id"], e["type"], e["data"]["object"]["id"], int(e["created"]), via="reconcile"
            )
            for e in self._gateway.events_since(since, list(inbox.HANDLED))
        ]
        newest = max((e.created for e in found), default=since)
        new_cursor = str(max(since, newest - _OVERLAP))
        with self._db.write() as conn:
            new = inbox.store(conn, found, utc_now(), LEASE)
            conn.execute(
                insert_into(conn.dialect.name, meta)
                .values(key=_CURSOR_KEY, value=new_cursor)
                .on_conflict_do_update(index_elements=["key"], set_={"value": new_cursor})
            )
        log.info("reconciled", listed=len(found), missed=len(new), since=since)
        if new:
            self.process(new)
        return len(new)
