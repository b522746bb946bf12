"""The grant outbox: what is owed to which cabinet, and its life.

pending → applied | rejected | expired. A grant is created inside the caller's
transaction (a comp grant here; a purchase later), so the grant exists exactly when the
thing that owes it does. Every change writes a history entry.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, RowMapping, insert, select, update

from insertcoin.protocol.ids import new_credit_id
from insertcoin.protocol.messages import Ack, CoinPulse
from insertcoin.server.errors import Invalid, NotFound
from insertcoin.server.store import history
from insertcoin.server.store.tables import cabinets, grants

log = structlog.get_logger(__name__)

PENDING, APPLIED, REJECTED, EXPIRED = "pending", "applied", "rejected", "expired"


@dataclass(frozen=True)
class Backoff:
    initial: float
    maximum: float

    def delay(self, attempt: int) -> timedelta:
        """Wait before re-sending after `attempt` sends (1-based)."""
        return timedelta(seconds=min(self.initial * 2 ** (attempt - 1), self.maximum))


@dataclass(frozen=True)
class AckOutcome:
    credit_id: str
    machine_id: str
    event: str  # "applied", "rejected", "duplicate", "applied_late", "ignored"
    created_at: datetime | None = None


def pulse_of(row: RowMapping, now: datetime) -> CoinPulse:
    return CoinPulse(
        machine_id=row["machine_id"],
        credits=row["credits"],
        timestamp=now,
        credit_id=row["credit_id"],
        expires_at=row["expires_at"],
    )


def _record(
    conn: Connection,
    row: RowMapping,
    *,
    event: str,
    to: str | None,
    now: datetime,
    detail: dict[str, Any] | None = None,
) -> None:
    history.record(
        conn,
        subject="grant",
        subject_id=row["credit_id"],
        machine_id=row["machine_id"],
        event=event,
        from_state=row["state"],
        to_state=to,
        at=now,
        detail=detail,
    )


def create(
    conn: Connection,
    *,
    machine_id: str,
    credits: int,
    source: str,
    reason: str | None,
    now: datetime,
    ttl: timedelta,
    backoff: Backoff,
) -> CoinPulse:
    """Insert a pending grant, counted as sent once: the caller publishes it after commit,
    and if that never happens the dispatcher re-sends it after the first backoff."""
    cabinet = conn.execute(
        select(cabinets.c.enabled).where(cabinets.c.machine_id == machine_id)
    ).first()
    if cabinet is None:
        raise NotFound(f"no cabinet {machine_id!r}")
    if not cabinet.enabled:
        raise Invalid(f"cabinet {machine_id!r} is disabled")
    credit_id = new_credit_id()
    expires_at = now + ttl
    conn.execute(
        insert(grants).values(
            credit_id=credit_id,
            machine_id=machine_id,
            credits=credits,
            source=source,
            reason=reason,
            state=PENDING,
            created_at=now,
            expires_at=expires_at,
            attempts=1,
            next_attempt_at=min(now + backoff.delay(1), expires_at),
            last_published_at=now,
        )
    )
    history.record(
        conn,
        subject="grant",
        subject_id=credit_id,
        machine_id=machine_id,
        event="created",
        to_state=PENDING,
        at=now,
        detail={"credits": credits, "source": source, "reason": reason},
    )
    log.info(
        "grant_created", machineId=machine_id, creditId=credit_id, credits=credits, source=source
    )
    return CoinPulse(
        machine_id=machine_id,
        credits=credits,
        timestamp=now,
        credit_id=credit_id,
        expires_at=expires_at,
    )


def claim_due(conn: Connection, now: datetime, backoff: Backoff, limit: int) -> list[CoinPulse]:
    """Expire overdue grants and return the ones to (re-)send now, rescheduled.

    Rows are locked with SKIP LOCKED on PostgreSQL, and moved past `now` before commit,
    so with several server processes no grant is handled by two at once.
    """
    rows = (
        conn.execute(
            select(grants)
            .where(grants.c.next_attempt_at <= now)
            .order_by(grants.c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .mappings()
        .all()
    )
    pulses: list[CoinPulse] = []
    for row in rows:
        if row["expires_at"] <= now:
            conn.execute(
                update(grants)
                .where(grants.c.credit_id == row["credit_id"], grants.c.state == PENDING)
                .values(
                    state=EXPIRED,
                    next_attempt_at=None,
                    settled_at=now,
                    settle_reason="no ack before expiresAt",
                )
            )
            _record(
                conn,
                row,
                event="expired",
                to=EXPIRED,
                now=now,
                detail={"attempts": row["attempts"]},
            )
            log.info(
                "grant_expired",
                machineId=row["machine_id"],
                creditId=row["credit_id"],
                attempts=row["attempts"],
            )
            continue
        attempts = row["attempts"] + 1
        conn.execute(
            update(grants)
            .where(grants.c.credit_id == row["credit_id"])
            .values(
                attempts=attempts,
                last_published_at=now,
                next_attempt_at=min(now + backoff.delay(attempts), row["expires_at"]),
            )
        )
        pulses.append(pulse_of(row, now))
    return pulses


def apply_acks(conn: Connection, acks: list[tuple[str, Ack]], now: datetime) -> list[AckOutcome]:
    """Settle grants from cabinet acks; `acks` pairs each ack with the cabinet of its topic."""
    ids = sorted({ack.credit_id for _, ack in acks})
    rows = {
        row["credit_id"]: row
        for row in conn.execute(
            select(grants)
            .where(grants.c.credit_id.in_(ids))
            .order_by(grants.c.credit_id)
            .with_for_update()
        ).mappings()
    }
    outcomes = []
    for machine_id, ack in acks:
        row = rows.get(ack.credit_id)
        if row is None or row["machine_id"] != machine_id:
            log.warning(
                "ack_ignored",
                machineId=machine_id,
                creditId=ack.credit_id,
                reason="unknown grant" if row is None else "grant of another cabinet",
            )
            outcomes.append(AckOutcome(ack.credit_id, machine_id, "ignored"))
            continue
        outcome = _settle(conn, row, ack, now)
        outcomes.append(outcome)
        if outcome.event in (APPLIED, REJECTED, "applied_late"):
            # Later acks in the same batch see the new state.
            rows[ack.credit_id] = (
                conn.execute(select(grants).where(grants.c.credit_id == ack.credit_id))
                .mappings()
                .one()
            )
    return outcomes


def _settle(conn: Connection, row: RowMapping, ack: Ack, now: datetime) -> AckOutcome:
    state, result = row["state"], ack.result
    ids = {"machineId": row["machine_id"], "creditId": row["credit_id"]}
    if (state == PENDING) or (state == EXPIRED and result == APPLIED):
        event = result if state == PENDING else "applied_late"
        to = APPLIED if result == APPLIED else REJECTED
        conn.execute(
            update(grants)
            .where(grants.c.credit_id == row["credit_id"])
            .values(state=to, next_attempt_at=None, settled_at=now, settle_reason=ack.reason)
        )
        _record(
            conn,
            row,
            event=event,
            to=to,
            now=now,
            detail={"reason": ack.reason} if ack.reason else None,
        )
        (log.warning if event == "applied_late" else log.info)(
            f"grant_{event}", **ids, reason=ack.reason, attempts=row["attempts"]
        )
        return AckOutcome(row["credit_id"], row["machine_id"], event, row["created_at"])
    if state == APPLIED and result == APPLIED:
        return AckOutcome(row["credit_id"], row["machine_id"], "duplicate")
    # A rejection after expiry, or an ack contradicting a settled grant: keep it on record.
    _record(
        conn, row, event=f"ack_{result}_ignored", to=None, now=now, detail={"reason": ack.reason}
    )
    log.info("ack_after_settlement", **ids, state=state, result=result)
    return AckOutcome(row["credit_id"], row["machine_id"], "ignored")


def get(conn: Connection, credit_id: str) -> dict[str, Any]:
    row = conn.execute(select(grants).where(grants.c.credit_id == credit_id)).mappings().first()
    if row is None:
        raise NotFound(f"no grant {credit_id!r}")
    return {
        "creditId": row["credit_id"],
        "machineId": row["machine_id"],
        "credits": row["credits"],
        "source": row["source"],
        "reason": row["reason"],
        "state": row["state"],
        "createdAt": row["created_at"],
        "expiresAt": row["expires_at"],
        "attempts": row["attempts"],
        "settledAt": row["settled_at"],
        "settleReason": row["settle_reason"],
        "history": history.entries(conn, "grant", credit_id),
    }
