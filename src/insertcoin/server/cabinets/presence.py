"""Cabinet presence from retained `status` messages (the Last Will marks a cabinet offline)."""

from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from insertcoin.protocol.messages import Status
from insertcoin.server.store.tables import presence

log = structlog.get_logger(__name__)


def apply_status(conn: Connection, status: Status, now: datetime) -> None:
    """Upsert presence; an online status older than the one on record is stale and ignored.

    Every server process may apply the same status (it is idempotent), so this is an
    upsert rather than insert-or-update in two steps.
    """
    values: dict[str, Any] = {
        "machine_id": status.machine_id,
        "online": status.online,
        "state": status.state,
        "credits": status.credits,
        "agent_version": status.agent_version,
        "reported_at": status.timestamp or now,
        "last_seen": now,
    }
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(presence).values(**values)
    changed = {k: stmt.excluded[k] for k in values if k != "machine_id"}
    if status.online:
        # Keep the previous state/credits when a Will (offline, no details) arrives.
        where = presence.c.reported_at <= stmt.excluded.reported_at
    else:
        for key in ("state", "credits", "agent_version"):
            if values[key] is None:
                changed.pop(key)
        where = None
    conn.execute(
        stmt.on_conflict_do_update(index_elements=["machine_id"], set_=changed, where=where)
    )
    log.info(
        "cabinet_status",
        machineId=status.machine_id,
        online=status.online,
        state=status.state,
        credits=status.credits,
    )
