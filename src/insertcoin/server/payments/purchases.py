"""Purchases: one per paid Checkout Session, and the money that follows its grant.

    authorized ──grant applied──> (capture) ──> credited
        │ └──grant rejected/expired──> (cancel | refund) ──> voided | refunded
        └──amounts or cabinet don't match the server's records──> needs_attention
    voided | refunded ──cabinet applied it after all──> needs_attention

A Stripe call that is owed is written down first (`action`, a money outbox) and made
by the settlement worker, so a crash between deciding and calling loses nothing.
Functions here never log and never call Stripe: the callers log after commit.
"""

import functools
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Executable,
    RowMapping,
    Update,
    and_,
    bindparam,
    select,
    update,
)

from insertcoin.protocol.ids import new_credit_id
from insertcoin.protocol.messages import CoinPulse
from insertcoin.server.delivery import grants
from insertcoin.server.errors import Conflict, NotFound
from insertcoin.server.payments.gateway import CheckoutSession
from insertcoin.server.store import history
from insertcoin.server.store.tables import cabinets, checkouts, purchases
from insertcoin.server.store.tables import grants as grants_table
from insertcoin.server.store.upsert import insert_into

AUTHORIZED, CREDITED, VOIDED, REFUNDED, NEEDS_ATTENTION = (
    "authorized",
    "credited",
    "voided",
    "refunded",
    "needs_attention",
)
STATES = (AUTHORIZED, CREDITED, VOIDED, REFUNDED, NEEDS_ATTENTION)
# Stripe calls: capture an authorization, cancel it, refund a captured payment,
# `release` (operator's refund: cancel or refund, whichever the payment's state needs), or
# `keep` (a captured payment whose automatic refund was tried before the credits turned
# out delivered: look whether a refund went through; if none did, the money stays).
CAPTURE, CANCEL, REFUND, RELEASE, KEEP = "capture", "cancel", "refund", "release", "keep"

# What a purchase becomes once its Stripe call took effect.
_SETTLED = {"captured": CREDITED, "canceled": VOIDED, "refunded": REFUNDED}

# Payment states in which the money is held for us: authorized, or already captured.
_HELD = {"requires_capture": False, "succeeded": True}


# Built once: a fresh select() costs more to build and hash than to run.
_CHECKOUTS = select(checkouts).where(
    checkouts.c.checkout_session_id.in_(bindparam("ids", expanding=True))
)
_CABINETS = select(cabinets).where(cabinets.c.machine_id.in_(bindparam("ids", expanding=True)))
_RECORDED = select(purchases.c.checkout_session_id, purchases.c.id).where(
    purchases.c.checkout_session_id.in_(bindparam("ids", expanding=True))
)


@dataclass(frozen=True)
class Recorded:
    event: str  # created | duplicate | needs_attention | undeliverable | ignored
    purchase_id: str | None = None
    machine_id: str | None = None
    pulse: CoinPulse | None = None
    reason: str | None = None


@dataclass(frozen=True)
class _Terms:
    """What the server itself asked for: the cabinet and price it put in the session."""

    machine_id: str
    unit_amount: int
    currency: str
    credits_per_purchase: int
    max_quantity: int


def _terms(conn: Connection, sessions: list[CheckoutSession]) -> dict[str, _Terms]:
    """What the server asked for, per session id (sessions it can't place are absent)."""
    found: dict[str, _Terms] = {
        row["checkout_session_id"]: _Terms(
            row["machine_id"],
            row["unit_amount"],
            row["currency"],
            row["credits_per_purchase"],
            row["max_quantity"],
        )
        for row in conn.execute(_CHECKOUTS, {"ids": [s.id for s in sessions]}).mappings()
    }
    # A session this server did not open (e.g. a Payment Link made in Stripe's dashboard
    # for the prototype): held against the cabinet's current price.
    others = {
        s.id: s.machine_id or s.client_reference_id
        for s in sessions
        if s.id not in found and (s.machine_id or s.client_reference_id)
    }
    if others:
        rows = conn.execute(_CABINETS, {"ids": sorted({m for m in others.values() if m})})
        by_machine = {row["machine_id"]: row for row in rows.mappings()}
        for session_id, machine_id in others.items():
            cabinet = by_machine.get(machine_id)
            if cabinet is not None:
                found[session_id] = _Terms(
                    cabinet["machine_id"],
                    cabinet["price_amount"],
                    cabinet["price_currency"],
                    cabinet["credits_per_purchase"],
                    cabinet["max_quantity"],
                )
    return found


def _mismatches(session: CheckoutSession, terms: _Terms) -> list[str]:
    """Where what Stripe reports differs from what the server asked for (G5)."""
    intent = session.payment_intent
    assert intent is not None
    found: list[str] = []
    if session.machine_id is not None and session.machine_id != terms.machine_id:
        found.append(f"session is for cabinet {session.machine_id!r}")
    if session.client_reference_id not in (None, terms.machine_id):
        found.append(f"client_reference_id is {session.client_reference_id!r}")
    if intent.metadata.get("machine_id") not in (None, terms.machine_id):
        found.append(f"payment is for cabinet {intent.metadata.get('machine_id')!r}")
    if session.currency != terms.currency or intent.currency != terms.currency:
        found.append(f"currency {session.currency!r}, expected {terms.currency!r}")
    if not 1 <= session.quantity <= terms.max_quantity:
        found.append(f"quantity {session.quantity} outside 1..{terms.max_quantity}")
    if any(unit != terms.unit_amount for unit in session.unit_amounts) or not session.unit_amounts:
        found.append(f"unit price {session.unit_amounts}, expected {terms.unit_amount}")
    expected = terms.unit_amount * session.quantity
    if session.amount_total != expected or intent.amount != expected:
        found.append(f"amount {session.amount_total}/{intent.amount}, expected {expected}")
    return found


def _history_row(
    purchase_id: str,
    machine_id: str,
    event: str,
    from_state: str | None,
    to: str | None,
    now: datetime,
    detail: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "subject": "purchase",
        "subject_id": purchase_id,
        "machine_id": machine_id,
        "event": event,
        "from_state": from_state,
        "to_state": to,
        "detail": detail,
        "at": now,
    }


def _history(
    conn: Connection,
    row: RowMapping | dict[str, Any],
    event: str,
    to: str | None,
    now: datetime,
    detail: dict[str, Any] | None = None,
) -> None:
    history.record_many(
        conn, [_history_row(row["id"], row["machine_id"], event, row.get("state"), to, now, detail)]
    )


def _ignored(session: CheckoutSession) -> str | None:
    """Why a session cannot be a purchase (yet), or None."""
    intent = session.payment_intent
    if session.status != "complete" or intent is None:
        return f"session is {session.status}, not complete"
    if intent.status not in _HELD:
        return f"payment is {intent.status}"
    return None


@functools.cache
def _insert_new(dialect: str) -> Executable:
    return insert_into(dialect, purchases).on_conflict_do_nothing().returning(purchases.c.id)


def record_many(
    conn: Connection, sessions: list[CheckoutSession], *, now: datetime, schedule: grants.Schedule
) -> list[Recorded]:
    """Record paid sessions as purchases with their grants, in the caller's transaction;
    one result per session, in order.

    Keyed on the session id (UNIQUE): a session already recorded, by an earlier call, by
    another process, or earlier in this batch, is a `duplicate`. A batch costs a fixed
    handful of statements, whatever its size.
    """
    results: list[Recorded | None] = [None] * len(sessions)
    rows = _rows(conn, sessions, results, now)
    inserted: set[str] = set()
    if rows:
        inserted = set(conn.execute(_insert_new(conn.dialect.name), list(rows.values())).scalars())
    duplicates = [row["checkout_session_id"] for row in rows.values() if row["id"] not in inserted]
    earlier: dict[str, str] = {}
    if duplicates:
        earlier = dict(conn.execute(_RECORDED, {"ids": duplicates}).all())
    entries: list[dict[str, Any]] = []
    requests: list[tuple[int, grants.GrantRequest]] = []
    for i, row in rows.items():
        if row["id"] not in inserted:
            session_id = row["checkout_session_id"]
            results[i] = Recorded("duplicate", earlier.get(session_id), row["machine_id"])
            continue
        detail = {
            "checkoutSessionId": row["checkout_session_id"],
            "paymentIntentId": row["payment_intent_id"],
        }
        entries.append(
            _history_row(row["id"], row["machine_id"], "created", None, row["state"], now, detail)
        )
        if row["state"] == NEEDS_ATTENTION:
            reason = row["attention_reason"]
            results[i] = Recorded("needs_attention", row["id"], row["machine_id"], reason=reason)
            continue
        request = grants.GrantRequest(
            row["machine_id"],
            row["credits"],
            grants.PURCHASE,
            row["id"],
            credit_id=row["credit_id"],
        )
        requests.append((i, request))
    history.record_many(conn, entries)
    if requests:
        _issue_grants(conn, rows, requests, results, now, schedule)
    recorded = [r for r in results if r is not None]
    assert len(recorded) == len(sessions)
    return recorded


def _rows(
    conn: Connection,
    sessions: list[CheckoutSession],
    results: list[Recorded | None],
    now: datetime,
) -> dict[int, dict[str, Any]]:
    """A purchase row per recordable session (by its index); the others' results set."""
    usable: list[tuple[int, CheckoutSession]] = []
    for i, session in enumerate(sessions):
        reason = _ignored(session)
        if reason is not None:
            results[i] = Recorded("ignored", reason=reason)
        else:
            usable.append((i, session))
    terms = _terms(conn, [s for _, s in usable]) if usable else {}
    rows: dict[int, dict[str, Any]] = {}
    seen: set[str] = set()
    for i, session in usable:
        found = terms.get(session.id)
        if found is None:
            results[i] = Recorded("ignored", reason="not a payment for a known cabinet")
        elif session.id in seen:
            results[i] = Recorded("duplicate", None, found.machine_id)
        else:
            seen.add(session.id)
            rows[i] = _row(session, found, now)
    return rows


def _issue_grants(
    conn: Connection,
    rows: dict[int, dict[str, Any]],
    requests: list[tuple[int, grants.GrantRequest]],
    results: list[Recorded | None],
    now: datetime,
    schedule: grants.Schedule,
) -> None:
    created = grants.create_many(conn, [r for _, r in requests], now=now, schedule=schedule)
    for (i, _), result in zip(requests, created, strict=True):
        row = rows[i]
        if isinstance(result, CoinPulse):
            results[i] = Recorded("created", row["id"], row["machine_id"], pulse=result)
            continue
        # Paid for a cabinet disabled since: nothing can be delivered, give the money back.
        action = REFUND if row["captured_at_payment"] else CANCEL
        conn.execute(
            update(purchases)
            .where(purchases.c.id == row["id"])
            .values(credit_id=None, action=action, action_due_at=now)
        )
        _history(conn, row, "undeliverable", None, now, {"reason": str(result), "action": action})
        results[i] = Recorded("undeliverable", row["id"], row["machine_id"], reason=str(result))


def _row(session: CheckoutSession, terms: _Terms, now: datetime) -> dict[str, Any]:
    intent = session.payment_intent
    assert intent is not None
    problems = _mismatches(session, terms)
    return {
        "id": "pu_" + secrets.token_hex(12),
        "checkout_session_id": session.id,
        "payment_intent_id": intent.id,
        "machine_id": terms.machine_id,
        "state": NEEDS_ATTENTION if problems else AUTHORIZED,
        "amount": intent.amount,
        "currency": intent.currency,
        "quantity": session.quantity,
        "credits": session.quantity * terms.credits_per_purchase,
        "credit_id": None if problems else new_credit_id(),
        "captured_at_payment": _HELD[intent.status],
        "attention_reason": "; ".join(problems) or None,
        "action_attempts": 0,
        "action_key_generation": 0,
        "created_at": now,
        "updated_at": now,
    }


_FOLLOWING = (
    select(purchases, grants_table.c.state.label("grant_state"))
    .join(grants_table, grants_table.c.credit_id == purchases.c.credit_id)
    .where(purchases.c.credit_id.in_(bindparam("ids", expanding=True)))
    .order_by(purchases.c.id)
    .with_for_update(of=purchases)
)


def follow_grants(conn: Connection, credit_ids: list[str], now: datetime) -> int:
    """Let purchases follow their grants once settled, in the same transaction that
    settled them: applied → capture (or credited, if captured at payment); rejected or
    expired → cancel (or refund); applied after a void → needs_attention. Returns how
    many purchases now owe a Stripe call."""
    if not credit_ids:
        return 0
    rows = conn.execute(_FOLLOWING, {"ids": credit_ids}).mappings().all()
    # The usual outcome (a call now owed) is written for the whole batch at once.
    owes: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    for row in rows:
        grant_state = row["grant_state"]
        if row["state"] == AUTHORIZED and row["action"] is None:
            if grant_state == grants.APPLIED:
                if row["captured_at_payment"]:
                    _set_states(conn, [(row, CREDITED, None)], now)
                    continue
                action = CAPTURE
            elif grant_state in (grants.REJECTED, grants.EXPIRED):
                action = REFUND if row["captured_at_payment"] else CANCEL
            else:
                continue
            owes.append({"b_id": row["id"], "b_action": action, "b_now": now})
            entries.append(
                _history_row(
                    row["id"], row["machine_id"], f"{action}_owed", row["state"], None, now, None
                )
            )
        elif row["state"] in (VOIDED, REFUNDED) and grant_state == grants.APPLIED:
            _attention(
                conn, row, now, f"the cabinet applied the credits after the {row['state']} payment"
            )
    if owes:
        conn.execute(_OWE, owes)
    history.record_many(conn, entries)
    return len(owes)


# Statements on the payment path are built once (see delivery/grants.py for why).
def _update_purchase(**values: Any) -> Update:
    """UPDATE of the purchase whose id is bound as `b_id`."""
    return update(purchases).where(purchases.c.id == bindparam("b_id")).values(**values)


_OWE = _update_purchase(
    action=bindparam("b_action"),
    action_due_at=bindparam("b_now"),
    action_error=None,
    updated_at=bindparam("b_now"),
)
_SET_STATE = _update_purchase(
    state=bindparam("b_state"),
    action=None,
    action_due_at=None,
    action_error=None,
    updated_at=bindparam("b_now"),
)


def _set_states(
    conn: Connection,
    changes: list[tuple[RowMapping, str, dict[str, Any] | None]],
    now: datetime,
) -> None:
    """Move each purchase to its new state, the owed call done (one statement each for
    the whole list); the history entry is named after the state."""
    if not changes:
        return
    conn.execute(
        _SET_STATE,
        [{"b_id": row["id"], "b_state": state, "b_now": now} for row, state, _ in changes],
    )
    history.record_many(
        conn,
        [
            _history_row(row["id"], row["machine_id"], state, row["state"], state, now, detail)
            for row, state, detail in changes
        ],
    )


def _attention(
    conn: Connection, row: RowMapping | dict[str, Any], now: datetime, reason: str
) -> None:
    conn.execute(
        update(purchases)
        .where(purchases.c.id == row["id"])
        .values(
            state=NEEDS_ATTENTION,
            attention_reason=reason,
            action=None,
            action_due_at=None,
            updated_at=now,
        )
    )
    _history(conn, row, "needs_attention", NEEDS_ATTENTION, now, {"reason": reason})


# The money outbox -----------------------------------------------------------------------


@dataclass(frozen=True)
class Owed:
    """A Stripe call claimed for making: idempotency key derived from what it acts on."""

    purchase_id: str
    machine_id: str
    action: str
    payment_intent_id: str
    generation: int
    attempts: int

    @property
    def idempotency_key(self) -> str:
        return f"insertcoin-{self.action}-{self.purchase_id}-{self.generation}"


_LEASE = _update_purchase(
    action=bindparam("b_action"),
    action_due_at=bindparam("b_due"),
    action_attempts=bindparam("b_attempts"),
)


def claim_owed(conn: Connection, now: datetime, lease: timedelta, limit: int) -> list[Owed]:
    """Take due Stripe calls, leased so no other process makes them meanwhile.

    A cancel or refund owed for a grant that has since been applied (a late ack before
    the call was made) turns into a capture: the cabinet gave the game, so charge it.
    """
    rows = (
        conn.execute(
            select(purchases, grants_table.c.state.label("grant_state"))
            .outerjoin(grants_table, grants_table.c.credit_id == purchases.c.credit_id)
            .where(purchases.c.action_due_at <= now)
            .order_by(purchases.c.action_due_at)
            .limit(limit)
            .with_for_update(of=purchases, skip_locked=True)
        )
        .mappings()
        .all()
    )
    owed: list[Owed] = []
    leases: list[dict[str, Any]] = []
    for row in rows:
        action = row["action"]
        if (
            action in (CANCEL, REFUND)
            and row["state"] == AUTHORIZED
            and row["grant_state"] == grants.APPLIED
        ):
            if not row["captured_at_payment"]:
                # Capturing a payment that an earlier attempt did cancel is refused, and
                # that ends in needs_attention: safe either way.
                action = CAPTURE
            elif row["action_attempts"] == 0:
                # The money was never sent back: keep it.
                _set_states(conn, [(row, CREDITED, None)], now)
                continue
            else:
                # An earlier attempt may have refunded it: find out, rather than finish
                # a refund of credits the cabinet did give.
                action = KEEP
            _history(conn, row, f"{action}_owed", None, now, {"instead_of": row["action"]})
        leases.append(
            {
                "b_id": row["id"],
                "b_action": action,
                "b_due": now + lease,
                "b_attempts": row["action_attempts"] + 1,
            }
        )
        owed.append(
            Owed(
                row["id"],
                row["machine_id"],
                action,
                row["payment_intent_id"],
                row["action_key_generation"],
                row["action_attempts"] + 1,
            )
        )
    if leases:
        conn.execute(_LEASE, leases)
    return owed


_OWING = (
    select(purchases, grants_table.c.state.label("grant_state"))
    .outerjoin(grants_table, grants_table.c.credit_id == purchases.c.credit_id)
    .where(purchases.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(purchases.c.id)
    .with_for_update(of=purchases)
)


def still_owing(conn: Connection, owed: list[Owed]) -> dict[str, RowMapping]:
    """The purchases, locked (in id order), that still owe the very call each was leased
    for, by purchase id; the others have moved on (e.g. an operator's refund)."""
    if not owed:
        return {}
    wanted = {o.purchase_id: o.action for o in owed}
    rows = conn.execute(_OWING, {"ids": sorted(wanted)}).mappings()
    return {row["id"]: row for row in rows if row["action"] == wanted[row["id"]]}


def settled(
    conn: Connection, done: list[tuple[RowMapping, str, dict[str, Any] | None]], now: datetime
) -> list[str]:
    """The Stripe calls these purchases (rows from `still_owing`) owed took effect: each
    outcome is captured, canceled or refunded, with a detail saying how it was found out
    if not from a clean answer. Written with one statement per kind for the whole batch;
    returns each purchase's new state."""
    states = [_SETTLED[outcome] for _, outcome, _ in done]
    _set_states(
        conn,
        [(row, state, detail) for (row, _, detail), state in zip(done, states, strict=True)],
        now,
    )
    for i, (row, _, _) in enumerate(done):
        if (
            states[i] != CREDITED
            and row["grant_state"] == grants.APPLIED
            and row["state"] == AUTHORIZED
        ):
            reason = f"the cabinet applied the credits after the {states[i]} payment"
            _attention(conn, {**row, "state": states[i]}, now, reason)
            states[i] = NEEDS_ATTENTION
    return states


def retry_later(
    conn: Connection,
    row: RowMapping,
    owed: Owed,
    now: datetime,
    delay: timedelta,
    error: str,
    *,
    new_key: bool,
) -> None:
    """The call failed: try again after `delay`; with `new_key` under a fresh idempotency
    key (Stripe keeps a 5xx under the old one, and the re-read showed no effect)."""
    conn.execute(
        update(purchases)
        .where(purchases.c.id == owed.purchase_id)
        .values(
            action_due_at=now + delay,
            action_error=error[:500],
            action_key_generation=row["action_key_generation"] + (1 if new_key else 0),
            updated_at=now,
        )
    )
    _history(
        conn,
        row,
        f"{owed.action}_failed",
        None,
        now,
        {"error": error[:500], "attempt": owed.attempts},
    )


def switch(
    conn: Connection, row: RowMapping, owed: Owed, action: str, now: datetime, why: str
) -> None:
    """Owe a different call instead (e.g. a refund where a cancel found it captured)."""
    conn.execute(
        update(purchases)
        .where(purchases.c.id == owed.purchase_id)
        .values(action=action, action_due_at=now, action_error=None, updated_at=now)
    )
    _history(conn, row, f"{action}_owed", None, now, {"instead_of": owed.action, "why": why})


def give_up(conn: Connection, row: RowMapping, now: datetime, reason: str) -> None:
    """The call cannot succeed (e.g. capture on a canceled authorization): the operator
    decides."""
    _attention(conn, row, now, reason)


# Operator ------------------------------------------------------------------------------


def request_refund(conn: Connection, purchase_id: str, now: datetime) -> bool:
    """Owe the player their money back (idempotent). True if a call is now owed."""
    row = (
        conn.execute(select(purchases).where(purchases.c.id == purchase_id).with_for_update())
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no purchase {purchase_id!r}")
    if row["state"] in (VOIDED, REFUNDED) or row["action"] in (REFUND, RELEASE):
        return False
    if row["state"] == AUTHORIZED and row["action"] != CAPTURE:
        raise Conflict(
            "the credits are still being delivered; the payment is released by itself if "
            "they are not, refund it once it is credited"
        )
    conn.execute(
        update(purchases)
        .where(purchases.c.id == purchase_id)
        .values(action=RELEASE, action_due_at=now, action_error=None, updated_at=now)
    )
    _history(conn, row, "refund_requested", None, now, {"by": "operator"})
    return True


# Views ---------------------------------------------------------------------------------

_VIEW = select(purchases, grants_table.c.state.label("grant_state")).outerjoin(
    grants_table, grants_table.c.credit_id == purchases.c.credit_id
)


def _view(conn: Connection, row: RowMapping, *, with_history: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row["id"],
        "machineId": row["machine_id"],
        "state": row["state"],
        "amount": row["amount"],
        "currency": row["currency"],
        "quantity": row["quantity"],
        "credits": row["credits"],
        "checkoutSessionId": row["checkout_session_id"],
        "paymentIntentId": row["payment_intent_id"],
        "creditId": row["credit_id"],
        "grantState": row["grant_state"],
        "pendingAction": row["action"],
        "actionError": row["action_error"],
        "attentionReason": row["attention_reason"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }
    if with_history:
        view["history"] = history.entries(conn, "purchase", row["id"])
    return view


def get(conn: Connection, purchase_id: str) -> dict[str, Any]:
    row = conn.execute(_VIEW.where(purchases.c.id == purchase_id)).mappings().first()
    if row is None:
        raise NotFound(f"no purchase {purchase_id!r}")
    return _view(conn, row, with_history=True)


def find(
    conn: Connection,
    *,
    machine_id: str | None,
    state: str | None,
    since: datetime | None,
    before: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Newest first; `before` (a purchase id from the previous page) pages on."""
    query = _VIEW
    if machine_id is not None:
        query = query.where(purchases.c.machine_id == machine_id)
    if state is not None:
        query = query.where(purchases.c.state == state)
    if since is not None:
        query = query.where(purchases.c.created_at >= since)
    if before is not None:
        anchor = conn.execute(
            select(purchases.c.created_at).where(purchases.c.id == before)
        ).scalar()
        if anchor is None:
            raise NotFound(f"no purchase {before!r} to page from")
        query = query.where(
            (purchases.c.created_at < anchor)
            | and_(purchases.c.created_at == anchor, purchases.c.id < before)
        )
    rows = conn.execute(
        query.order_by(purchases.c.created_at.desc(), purchases.c.id.desc()).limit(limit)
    ).mappings()
    return [_view(conn, row, with_history=False) for row in rows]


def of_session(conn: Connection, machine_id: str, session_id: str) -> dict[str, Any] | None:
    """What the player's success page shows; None until the payment is recorded."""
    row = (
        conn.execute(
            _VIEW.where(
                purchases.c.checkout_session_id == session_id, purchases.c.machine_id == machine_id
            )
        )
        .mappings()
        .first()
    )
    return None if row is None else _view(conn, row, with_history=False)
