"""The append-only record of every state change (GUARANTEES G8)."""

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from insertcoin.server.store.tables import history

# Built once: building and hashing a statement per call costs more than running it.
_INSERT = insert(history)


def record(
    conn: Connection,
    *,
    subject: str,
    subject_id: str,
    machine_id: str | None,
    event: str,
    at: datetime,
    from_state: str | None = None,
    to_state: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        _INSERT,
        {
            "subject": subject,
            "subject_id": subject_id,
            "machine_id": machine_id,
            "event": event,
            "from_state": from_state,
            "to_state": to_state,
            "detail": detail,
            "at": at,
        },
    )


def record_many(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Append several entries in one call (rows shaped as the table's columns): one
    executemany, which SQLite runs in C and psycopg pipelines."""
    if rows:
        conn.execute(_INSERT, rows)


def entries(conn: Connection, subject: str, subject_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(history)
        .where(history.c.subject == subject, history.c.subject_id == subject_id)
        .order_by(history.c.id)
    ).mappings()
    return [
        {
            "event": row["event"],
            "from": row["from_state"],
            "to": row["to_state"],
            "at": row["at"],
            "detail": row["detail"],
        }
        for row in rows
    ]
