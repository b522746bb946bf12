"""Cabinet presence from retained `status` messages (the Last Will marks a cabinet offline)."""

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, or_

from insertcoin.protocol.messages import Status
from insertcoin.server.store.tables import presence
from insertcoin.server.store.upsert import insert_into


def apply_status(conn: Connection, status: Status, now: datetime) -> None:
    """Upsert presence.

    `reported_at` is only ever the cabinet's own clock, so statuses are ordered against
    each other and never against the server's clock (a Raspberry Pi without a clock
    battery can be minutes off). An online status not newer than the one on record is
    stale (a retained copy seen again) and ignored. A Will carries no timestamp: it
    marks the cabinet offline and keeps the last known state, credits and time.
    Every server process may apply the same status, hence an upsert.
    """
    values: dict[str, Any] = {
        "machine_id": status.machine_id,
        "online": status.online,
        "state": status.state,
        "credits": status.credits,
        "agent_version": status.agent_version,
        "reported_at": status.timestamp,
        "last_seen": now,
    }
    stmt = insert_into(conn.dialect.name, presence).values(**values)
    changed = {k: stmt.excluded[k] for k in values if k != "machine_id" and values[k] is not None}
    where = None
    if status.online:
        where = or_(
            presence.c.reported_at.is_(None), presence.c.reported_at < stmt.excluded.reported_at
        )
    conn.execute(
        stmt.on_conflict_do_update(index_elements=["machine_id"], set_=changed, where=where)
    )
