"""Engine, transactions and migrations for SQLite and PostgreSQL.

SQLite runs in WAL mode with synchronous=FULL, so a committed grant survives power loss
before any answer says it exists. Writers queue on a lock of their own, across threads
and across processes sharing the file (SQLite allows one writer anyway, and its busy
handler sleeps in coarse steps: two processes left to it write at half the rate of
one), and take SQLite's write lock at BEGIN so they never deadlock on a lock upgrade.
"""

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Connection, create_engine, event, make_url, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, OperationalError

from insertcoin.server.errors import ConfigError

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Every server process takes this PostgreSQL advisory lock around migrations.
_MIGRATION_LOCK_ID = 0x1C0FFEE


# A pooled PostgreSQL connection idle this long is pinged before use.
_PING_AFTER_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Like `pool_pre_ping`, but only for connections idle a while.

    A connection the database dropped (a restart, a failover, an idle timeout) fails
    on first use; the ping finds it first, and the pool replaces it. Under load every
    connection is back in use within milliseconds, and a ping per checkout was one
    more round trip on each of the two or three transactions per grant.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < _PING_AFTER_IDLE_SECONDS:
            return  # new, or just used
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool discards this connection and checks out another (up to 3 tries).
            raise DisconnectionError("pooled connection is gone") from exc


class _WriterLock:
    """One writer at a time among this process's threads (a mutex) and among the
    processes sharing the SQLite file (`flock` on `<file>-writer.lock`: the kernel wakes
    the next waiter at once, where SQLite's busy handler would sleep)."""

    def __init__(self, database: str | None) -> None:
        self._threads = threading.Lock()
        self._path = None if database in (None, "", ":memory:") else f"{database}-writer.lock"
        self._fd: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            if self._path is None:
                yield
                return
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._threads:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = self._create_engine(url, pool_size)
        self._writers = _WriterLock(self.engine.url.database) if self.is_sqlite else None

    def _create_engine(self, url: str, pool_size: int) -> Engine:
        if not self.is_sqlite:
            engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size * 2)
            _ping_when_idle(engine)
            return engine
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
            for pragma in (
                "journal_mode=WAL",
                "synchronous=FULL",
                "foreign_keys=ON",
                "busy_timeout=30000",
            ):
                dbapi_conn.execute(f"PRAGMA {pragma}")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            writing = conn.get_execution_options().get("insertcoin_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writing else "BEGIN")

        return engine

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One read-write transaction; committed when the block ends without error."""
        if self._writers is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._writers.held(), self.engine.connect() as raw:
            conn = raw.execution_options(insertcoin_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def migration_lock(self) -> Iterator[None]:
        """Held by one process at a time, around a migration."""
        if self._writers is not None:
            with self._writers.held():
                yield
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _MIGRATION_LOCK_ID})
                conn.commit()

    def check(self) -> None:
        """Raise if the database does not answer."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
        if self._writers is not None:
            self._writers.close()

    def describe(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)


def open_database(url: str, *, variable: str = "INSERTCOIN_DATABASE_URL") -> Database:
    """Open and check the database; an unreachable one is a ConfigError naming the variable."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        raise ConfigError(f"{variable}: cannot parse the database URL") from None
    try:
        db = Database(url)
        db.check()
    except (OperationalError, DBAPIError) as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(f"{variable}: cannot open {shown}: {reason}") from None
    except Exception as exc:  # an unknown driver, a file that is not SQLite...
        raise ConfigError(f"{variable}: cannot open {shown}: {exc}") from None
    return db


def current_revision(db: Database) -> str | None:
    with db.read() as conn:
        try:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        except DBAPIError:
            return None
    return row[0] if row else None


def upgrade(db: Database) -> str:
    """Apply pending migrations; cheap when up to date (Alembic is imported only if needed).
    Processes started together take turns: the first migrates, the others find it done."""
    from insertcoin.server.store.migrations import LATEST_REVISION  # noqa: PLC0415

    if current_revision(db) == LATEST_REVISION:
        return LATEST_REVISION
    from alembic import command  # noqa: PLC0415 - heavy, and rarely needed at start
    from alembic.config import Config  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with db.migration_lock():
        if current_revision(db) == LATEST_REVISION:
            return LATEST_REVISION
        with db.engine.connect() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            conn.commit()
    log.info("database_migrated", revision=LATEST_REVISION, database=db.describe())
    return LATEST_REVISION
