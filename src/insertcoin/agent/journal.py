"""The cabinet's credit journal: which creditIds it answered, and the credit counter.

A grant is committed here, fsynced, BEFORE any credit reaches the game, so after a
crash or a power cut the agent knows it already took that creditId (PROTOCOL.md section
2, G4). Losing a credit in flight is possible; giving one twice is not.

WAL journal mode with synchronous=FULL: in WAL mode FULL fsyncs the log on every commit,
so a returned commit survives power loss (NORMAL would not), and a commit costs one
sequential append + fsync instead of the rollback journal's several; readers (the
status, the screen) never block the writer either.
"""

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from insertcoin.protocol import format_timestamp, utc_now

Result = Literal["applied", "rejected"]
State = Literal["attract", "playing", "out_of_service"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    credit_id   TEXT PRIMARY KEY,
    credits     INTEGER NOT NULL,
    result      TEXT NOT NULL CHECK (result IN ('applied', 'rejected')),
    reason      TEXT,
    recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    credits INTEGER NOT NULL CHECK (credits >= 0),
    state   TEXT NOT NULL CHECK (state IN ('attract', 'playing'))
);
INSERT OR IGNORE INTO counter (id, credits, state) VALUES (1, 0, 'attract');
"""


@dataclass(frozen=True)
class Recorded:
    result: Result
    reason: str | None
    duplicate: bool  # True: the earlier answer for this creditId, nothing was changed


@dataclass(frozen=True)
class Counter:
    credits: int
    state: Literal["attract", "playing"]


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared under a lock: the MQTT worker and the local API both write.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def lookup(self, credit_id: str) -> Recorded | None:
        with self._lock:
            row = self._db.execute(
                "SELECT result, reason FROM grants WHERE credit_id = ?", (credit_id,)
            ).fetchone()
        return None if row is None else Recorded(row[0], row[1], duplicate=True)

    def record(self, credit_id: str, credits: int) -> Recorded:
        """Take a grant: remember its id and add its credits to the counter, atomically."""
        return self._insert(credit_id, credits, "applied", None)

    def reject(self, credit_id: str, credits: int, reason: str) -> Recorded:
        """Remember a refusal, so a re-delivery gets the same answer."""
        return self._insert(credit_id, credits, "rejected", reason)

    def _insert(self, credit_id: str, credits: int, result: Result, reason: str | None) -> Recorded:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT result, reason FROM grants WHERE credit_id = ?", (credit_id,)
                ).fetchone()
                if row is not None:
                    self._db.execute("ROLLBACK")
                    return Recorded(row[0], row[1], duplicate=True)
                self._db.execute(
                    "INSERT INTO grants (credit_id, credits, result, reason, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (credit_id, credits, result, reason, format_timestamp(utc_now())),
                )
                if result == "applied":
                    self._db.execute(
                        "UPDATE counter SET credits = credits + ? WHERE id = 1", (credits,)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Recorded(result, reason, duplicate=False)

    def recent_applied(self, limit: int) -> tuple[str, ...]:
        """The latest `limit` creditIds applied, oldest first (rowid is insertion order)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT credit_id FROM grants WHERE result = 'applied' ORDER BY rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return tuple(row[0] for row in reversed(rows))

    def counter(self) -> Counter:
        with self._lock:
            credits, state = self._db.execute(
                "SELECT credits, state FROM counter WHERE id = 1"
            ).fetchone()
        return Counter(int(credits), state)

    def take_one(self, state: Literal["attract", "playing"]) -> bool:
        """Spend one credit and set the state, durably, before the game gets it."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE counter SET credits = credits - 1, state = ? WHERE id = 1 AND credits > 0",
                (state,),
            )
        return cursor.rowcount == 1

    def set_state(self, state: Literal["attract", "playing"]) -> None:
        with self._lock:
            self._db.execute("UPDATE counter SET state = ? WHERE id = 1", (state,))
