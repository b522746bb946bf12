"""INSERT ... ON CONFLICT, in the dialect of the connection at hand.

Each dialect module is imported on first use: `sqlalchemy.dialects.postgresql` loads
the dialects of every PostgreSQL driver, 30 ms of a SQLite server's start-up.
"""

from typing import TYPE_CHECKING

from sqlalchemy import Table

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite


def insert_into(dialect: str, table: Table) -> "postgresql.Insert | sqlite.Insert":
    """An INSERT that takes `on_conflict_do_nothing()` / `on_conflict_do_update()`, for
    `dialect` (a connection's `dialect.name`)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # noqa: PLC0415

        return insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert  # noqa: PLC0415

    return sqlite_insert(table)
