"""Migrations: LATEST_REVISION (which lets an up-to-date server start without importing
Alembic) is Alembic's head, and migrating an empty database gives exactly the schema in
`tables.metadata`, on SQLite and on PostgreSQL."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import delete, insert, inspect, select, update
from sqlalchemy.exc import DBAPIError

from insertcoin.protocol import utc_now
from insertcoin.server.store.database import (
    MIGRATIONS_DIR,
    Database,
    current_revision,
    open_database,
    upgrade,
)
from insertcoin.server.store.migrations import LATEST_REVISION
from insertcoin.server.store.tables import history, metadata
from tests.support.server import ServerProcess, make_settings
from tests.support.services import mosquitto


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    settings = make_settings(db_url, "mqtt://127.0.0.1:1", "test/migrations")
    database = open_database(settings.sqlalchemy_url)
    yield database
    database.dispose()


def _diffs(db: Database) -> list[object]:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def _tables(db: Database) -> set[str]:
    return set(inspect(db.engine).get_table_names())


def test_latest_revision_is_the_alembic_head():
    """LATEST_REVISION names the single head of the migration scripts."""
    script = ScriptDirectory.from_config(_config())
    assert script.get_heads() == [LATEST_REVISION]
    assert script.get_current_head() == LATEST_REVISION


def test_migrating_an_empty_database_matches_the_metadata(db: Database):
    """Upgrading an empty database reaches LATEST_REVISION with every table of
    `tables.metadata`, and Alembic's autogenerate comparison finds no difference."""
    assert current_revision(db) is None
    assert upgrade(db) == LATEST_REVISION
    assert current_revision(db) == LATEST_REVISION
    assert set(metadata.tables) <= _tables(db)
    assert _diffs(db) == []


def test_migrations_go_down_and_up_again(db: Database):
    """Downgrading to base removes every table; upgrading again restores the same schema,
    and a second upgrade is a no-op."""
    upgrade(db)
    config = _config()
    with db.engine.connect() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
        conn.commit()
    assert _tables(db) & set(metadata.tables) == set()
    assert current_revision(db) is None
    assert upgrade(db) == LATEST_REVISION
    assert upgrade(db) == LATEST_REVISION
    assert _diffs(db) == []


def test_revision_files_name_their_revision():
    """Each file in versions/ starts with its revision id, so the head is easy to find."""
    script = ScriptDirectory.from_config(_config())
    for revision in script.walk_revisions():
        assert Path(revision.path).name.startswith(f"{revision.revision}_")


def test_history_is_append_only(db: Database):
    """The database itself refuses to change or delete a history entry (GUARANTEES G8):
    only inserts reach the record of state changes."""
    upgrade(db)
    entry = {"subject": "grant", "subject_id": "cr_x", "event": "created", "at": utc_now()}
    with db.write() as conn:
        conn.execute(insert(history).values(**entry))
    for statement in (update(history).values(event="applied"), delete(history)):
        with pytest.raises(DBAPIError, match="history is append-only"), db.write() as conn:
            conn.execute(statement)
    with db.read() as conn:
        assert conn.execute(select(history.c.event)).scalars().all() == ["created"]


def test_serve_migrates_in_a_child_process(db: Database, db_url: str, tmp_path: Path):
    """`serve` on an empty database has `insertcoin db upgrade` migrate it in a child
    process, so Alembic (with Mako and Pygments, 13.5 MiB) never enters the server that
    stays up: under `-X importtime`, which a child does not inherit, the server imports
    no alembic module, and it serves the latest schema."""
    with mosquitto(tmp_path) as broker:
        server = ServerProcess(
            {"INSERTCOIN_DATABASE_URL": db_url, "INSERTCOIN_MQTT_URL": broker.url},
            tmp_path,
            interpreter=(sys.executable, "-X", "importtime"),
        )
        try:
            server.start(timeout=30)
        finally:
            server.stop()
    output = server.log.read_text()
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in output.splitlines()
        if line.startswith("import time:")
    }
    assert "insertcoin.server.app" in imported
    assert {name for name in imported if name.split(".")[0] in ("alembic", "mako")} == set()
    assert f"is at revision {LATEST_REVISION}" in output
    assert current_revision(db) == LATEST_REVISION
