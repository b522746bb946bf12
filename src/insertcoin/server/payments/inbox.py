"""The Stripe event inbox: events stored durably before Stripe gets its 200 (or when the
reconciler finds them), then processed. Keyed on the event id, so a redelivered or
re-listed event is stored once."""

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Executable, bindparam, select, update

from insertcoin.server.store.tables import stripe_events
from insertcoin.server.store.upsert import insert_into

COMPLETED = "checkout.session.completed"
ASYNC_SUCCEEDED = "checkout.session.async_payment_succeeded"
ASYNC_FAILED = "checkout.session.async_payment_failed"
EXPIRED = "checkout.session.expired"
# The events that can start a purchase, or say why none will come.
HANDLED = (COMPLETED, ASYNC_SUCCEEDED, ASYNC_FAILED, EXPIRED)
PAYING = (COMPLETED, ASYNC_SUCCEEDED)


@dataclass(frozen=True)
class InboxEvent:
    id: str
    type: str
    object_id: str  # the Checkout Session
    created: int
    via: str = "webhook"  # or "reconcile"
    attempts: int = 1


@functools.cache
def _insert_new(dialect: str) -> Executable:
    new = insert_into(dialect, stripe_events).on_conflict_do_nothing()
    return new.returning(stripe_events.c.id)


def store(
    conn: Connection, events: list[InboxEvent], now: datetime, lease: timedelta
) -> list[InboxEvent]:
    """Store events not seen before; returns those, leased to the caller for processing."""
    if not events:
        return []
    rows = [
        {
            "id": e.id,
            "type": e.type,
            "object_id": e.object_id,
            "created": e.created,
            "via": e.via,
            "received_at": now,
            "due_at": now + lease,
            "attempts": 1,
        }
        for e in events
    ]
    new = set(conn.execute(_insert_new(conn.dialect.name), rows).scalars())
    return [e for e in events if e.id in new]


def claim_due(conn: Connection, now: datetime, lease: timedelta, limit: int) -> list[InboxEvent]:
    """Unprocessed events whose lease ran out (their process died, or a retry is due)."""
    rows = (
        conn.execute(
            select(stripe_events)
            .where(stripe_events.c.due_at <= now)
            .order_by(stripe_events.c.due_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .mappings()
        .all()
    )
    for row in rows:
        conn.execute(
            update(stripe_events)
            .where(stripe_events.c.id == row["id"])
            .values(due_at=now + lease, attempts=row["attempts"] + 1)
        )
    return [
        InboxEvent(r["id"], r["type"], r["object_id"], r["created"], r["via"], r["attempts"] + 1)
        for r in rows
    ]


_PROCESSED = (
    update(stripe_events)
    .where(stripe_events.c.id == bindparam("b_id"))
    .values(due_at=None, processed_at=bindparam("b_now"), result=bindparam("b_result"))
)


def processed(conn: Connection, results: list[tuple[str, str]], now: datetime) -> None:
    """Mark events done, each with what came of it (one statement for the batch)."""
    if results:
        conn.execute(
            _PROCESSED,
            [{"b_id": event_id, "b_now": now, "b_result": r[:500]} for event_id, r in results],
        )


def retry(conn: Connection, event_id: str, due: datetime, error: str) -> None:
    conn.execute(
        update(stripe_events)
        .where(stripe_events.c.id == event_id)
        .values(due_at=due, result=error[:500])
    )
