"""The grant outbox: what is owed to which cabinet, and its life.

pending → applied | rejected | expired. A grant is created inside the caller's
transaction (a comp grant here; a purchase later), so the grant exists exactly when the
thing that owes it does. Every change writes a history entry. Batches are settled with
a fixed handful of statements, not a few per grant: on PostgreSQL every statement is a
round trip, and a slow batch is one a crash can roll back.

Functions here never log: the caller logs what they return once it has committed, so
the log never tells of a change that was rolled back.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, RowMapping, bindparam, insert, select, update

from insertcoin.protocol.ids import new_credit_id
from insertcoin.protocol.messages import Ack, CoinPulse
from insertcoin.server.errors import InsertcoinError, Invalid, NotFound
from insertcoin.server.store import history
from insertcoin.server.store.tables import cabinets, grants

PENDING, APPLIED, REJECTED, EXPIRED = "pending", "applied", "rejected", "expired"
COMP, PURCHASE = "comp", "purchase"  # a grant's source


@dataclass(frozen=True)
class Schedule:
    """When a grant is sent, re-sent, and given up on.

    Re-sends back off from `initial` doubling to `maximum` until `expiresAt`. Past it,
    the grant is sent a little longer (every `initial`, for `grace`): a cabinet that
    applied it re-acks it, which heals an ack lost just before expiry; one that did not
    rejects it. Only then is it marked expired.
    """

    ttl: timedelta
    initial: float
    maximum: float
    grace: timedelta

    def delay(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.initial * 2 ** (attempts - 1), self.maximum))

    def next_attempt(self, now: datetime, attempts: int, expires_at: datetime) -> datetime:
        if now < expires_at:
            return min(now + self.delay(attempts), expires_at)
        return min(now + timedelta(seconds=self.initial), expires_at + self.grace)

    def is_over(self, now: datetime, expires_at: datetime) -> bool:
        return now >= expires_at + self.grace


@dataclass(frozen=True)
class AckOutcome:
    credit_id: str
    machine_id: str
    event: str  # "applied", "rejected", "applied_late", "duplicate", "ignored"
    reason: str | None = None
    created_at: datetime | None = None  # set when the ack settled the grant
    source: str | None = None  # COMP or PURCHASE, set when the ack settled the grant


@dataclass(frozen=True)
class Claim:
    pulses: list[CoinPulse]  # to publish now
    expired: list[tuple[str, str]]  # (machineId, creditId) given up on


def _pulse(row: RowMapping, now: datetime) -> CoinPulse:
    return CoinPulse(
        machine_id=row["machine_id"],
        credits=row["credits"],
        timestamp=now,
        credit_id=row["credit_id"],
        expires_at=row["expires_at"],
    )


def _history_row(
    row: Mapping[str, Any] | RowMapping,
    event: str,
    to: str | None,
    now: datetime,
    detail: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "subject": "grant",
        "subject_id": row["credit_id"],
        "machine_id": row["machine_id"],
        "event": event,
        "from_state": row["state"],
        "to_state": to,
        "detail": detail,
        "at": now,
    }


class GrantFollower(Protocol):
    """Whatever hangs on a grant's outcome (a purchase's money). `follow` runs inside the
    transaction that settled the grants, so the two never disagree after a crash, and
    says how much work it left (payments owed to Stripe); `committed` runs after that
    transaction committed, and only when there is such work."""

    def follow(self, conn: Connection, credit_ids: list[str], now: datetime) -> int: ...

    def committed(self) -> None: ...


@dataclass(frozen=True)
class GrantRequest:
    machine_id: str
    credits: int
    source: str  # COMP or PURCHASE
    reason: str | None
    credit_id: str | None = None  # chosen by the caller when it must record it too


# Statements on the hot paths are built once: building and hashing a fresh `select()`
# costs more CPU than executing it (≈ 100 µs against ≈ 30 µs on SQLite), and the
# compiled form is cached by SQLAlchemy either way. `expanding` takes any number of ids.
_ENABLED = select(cabinets.c.machine_id, cabinets.c.enabled).where(
    cabinets.c.machine_id.in_(bindparam("ids", expanding=True))
)
_INSERT_GRANT = insert(grants)


def create_many(
    conn: Connection, requests: list[GrantRequest], *, now: datetime, schedule: Schedule
) -> list[CoinPulse | InsertcoinError]:
    """Insert pending grants, each counted as sent once: the caller publishes them after
    commit, and what is never published the dispatcher re-sends after the first backoff.

    A request for an unknown or disabled cabinet gets its error in the result list and
    writes nothing, so one bad request never spoils the others in a batch.
    """
    enabled = dict(conn.execute(_ENABLED, {"ids": sorted({r.machine_id for r in requests})}).all())
    results: list[CoinPulse | InsertcoinError] = []
    rows: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    expires_at = now + schedule.ttl
    for request in requests:
        if request.machine_id not in enabled:
            results.append(NotFound(f"no cabinet {request.machine_id!r}"))
            continue
        if not enabled[request.machine_id]:
            results.append(Invalid(f"cabinet {request.machine_id!r} is disabled"))
            continue
        pulse = CoinPulse(
            machine_id=request.machine_id,
            credits=request.credits,
            timestamp=now,
            credit_id=request.credit_id or new_credit_id(),
            expires_at=expires_at,
        )
        rows.append(
            {
                "credit_id": pulse.credit_id,
                "machine_id": request.machine_id,
                "credits": request.credits,
                "source": request.source,
                "reason": request.reason,
                "state": PENDING,
                "created_at": now,
                "expires_at": expires_at,
                "attempts": 1,
                "next_attempt_at": schedule.next_attempt(now, 1, expires_at),
                "last_published_at": now,
            }
        )
        new = {"credit_id": pulse.credit_id, "machine_id": request.machine_id, "state": None}
        detail = {"credits": request.credits, "source": request.source, "reason": request.reason}
        entries.append(_history_row(new, "created", PENDING, now, detail))
        results.append(pulse)
    if rows:
        conn.execute(_INSERT_GRANT, rows)
        history.record_many(conn, entries)
    return results


_RESCHEDULE = (
    update(grants)
    .where(grants.c.credit_id == bindparam("b_credit_id"))
    .values(
        attempts=bindparam("b_attempts"),
        last_published_at=bindparam("b_now"),
        next_attempt_at=bindparam("b_next"),
    )
)


def claim_due(
    conn: Connection, now: datetime, schedule: Schedule, limit: int, *, only_expired: bool = False
) -> Claim:
    """Expire grants past their grace and return the ones to (re-)send now, rescheduled.

    Rows are locked with SKIP LOCKED on PostgreSQL, and moved past `now` before commit,
    so with several server processes no grant is handled by two at once. With
    `only_expired` (no broker to send through) only grants past their grace are taken.
    """
    query = select(grants).where(grants.c.next_attempt_at <= now)
    if only_expired:
        query = query.where(grants.c.expires_at <= now - schedule.grace)
    rows = (
        conn.execute(
            query.order_by(grants.c.next_attempt_at).limit(limit).with_for_update(skip_locked=True)
        )
        .mappings()
        .all()
    )
    over = [row for row in rows if schedule.is_over(now, row["expires_at"])]
    due = [row for row in rows if not schedule.is_over(now, row["expires_at"])]
    if over:
        conn.execute(
            update(grants)
            .where(grants.c.credit_id.in_([r["credit_id"] for r in over]))
            .where(grants.c.state == PENDING)
            .values(
                state=EXPIRED,
                next_attempt_at=None,
                settled_at=now,
                settle_reason="no ack before expiresAt",
            )
        )
        history.record_many(
            conn,
            [_history_row(r, "expired", EXPIRED, now, {"attempts": r["attempts"]}) for r in over],
        )
    if due:
        conn.execute(
            _RESCHEDULE,
            [
                {
                    "b_credit_id": r["credit_id"],
                    "b_attempts": r["attempts"] + 1,
                    "b_now": now,
                    "b_next": schedule.next_attempt(now, r["attempts"] + 1, r["expires_at"]),
                }
                for r in due
            ],
        )
    return Claim(
        pulses=[_pulse(r, now) for r in due],
        expired=[(r["machine_id"], r["credit_id"]) for r in over],
    )


_SETTLE = (
    update(grants)
    .where(grants.c.credit_id == bindparam("b_credit_id"))
    .where(grants.c.state == bindparam("b_from"))
    .values(
        state=bindparam("b_to"),
        next_attempt_at=None,
        settled_at=bindparam("b_now"),
        settle_reason=bindparam("b_reason"),
    )
)


# Locked in a fixed order, so two processes settling overlapping batches cannot deadlock.
# Only the columns settling needs: each datetime read costs a conversion.
_LOCK_GRANTS = (
    select(
        grants.c.credit_id,
        grants.c.machine_id,
        grants.c.state,
        grants.c.created_at,
        grants.c.source,
    )
    .where(grants.c.credit_id.in_(bindparam("ids", expanding=True)))
    .order_by(grants.c.credit_id)
    .with_for_update()
)


def apply_acks(conn: Connection, acks: list[tuple[str, Ack]], now: datetime) -> list[AckOutcome]:
    """Settle grants from cabinet acks; `acks` pairs each ack with the cabinet of its topic.

    A cabinet can only settle its own grants. The first ack that settles a grant wins;
    later ones (in this batch or after) are duplicates or kept on record as ignored.
    """
    ids = sorted({ack.credit_id for _, ack in acks})
    current: dict[str, dict[str, Any]] = {
        row["credit_id"]: dict(row) for row in conn.execute(_LOCK_GRANTS, {"ids": ids}).mappings()
    }
    settles: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    outcomes: list[AckOutcome] = []
    for machine_id, ack in acks:
        row = current.get(ack.credit_id)
        if row is None or row["machine_id"] != machine_id:
            reason = "unknown grant" if row is None else "grant of another cabinet"
            outcomes.append(AckOutcome(ack.credit_id, machine_id, "ignored", reason))
            continue
        state, result = row["state"], ack.result
        detail = {"reason": ack.reason} if ack.reason else None
        # An applied ack after expiry, or after a rejection (the cabinet refused a copy,
        # then applied a redelivered one before expiresAt), is what the cabinet did:
        # record it, so the money can follow.
        if state == PENDING or (state in (EXPIRED, REJECTED) and result == APPLIED):
            event = result if state == PENDING else "applied_late"
            to = APPLIED if result == APPLIED else REJECTED
            settles.append(
                {
                    "b_credit_id": ack.credit_id,
                    "b_from": state,
                    "b_to": to,
                    "b_now": now,
                    "b_reason": ack.reason,
                }
            )
            entries.append(_history_row(row, event, to, now, detail))
            outcomes.append(
                AckOutcome(
                    ack.credit_id, machine_id, event, ack.reason, row["created_at"], row["source"]
                )
            )
            row["state"] = to
        elif state == APPLIED and result == APPLIED:
            outcomes.append(AckOutcome(ack.credit_id, machine_id, "duplicate"))
        else:
            # A rejection after expiry, or an ack contradicting a settled grant.
            entries.append(_history_row(row, f"ack_{result}_ignored", None, now, detail))
            outcomes.append(AckOutcome(ack.credit_id, machine_id, "ignored", f"grant is {state}"))
    if settles:
        conn.execute(_SETTLE, settles)
    history.record_many(conn, entries)
    return outcomes


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
