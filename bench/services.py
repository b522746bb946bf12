"""What a benchmark run stands on: a private Mosquitto, a fresh database, the server as a
child process (`python -m insertcoin serve`), the acker process, direct database reads,
and CPU accounting per process from /proc."""

import http.client
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import psycopg

from tests.support.services import PG_URL, Mosquitto, free_port

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"

# Production timings, except a fixed admin token: a grant is re-sent only if it is not
# acked within 5 s, so a healthy run re-sends nothing.
SERVER_ENV = {
    "INSERTCOIN_ADMIN_TOKEN": ADMIN_TOKEN,
    "INSERTCOIN_RETRY_INITIAL_SECONDS": "5",
    "INSERTCOIN_RETRY_MAX_SECONDS": "30",
    "INSERTCOIN_DISPATCH_INTERVAL_SECONDS": "1",
    "INSERTCOIN_CREDIT_TTL_SECONDS": "120",
    "INSERTCOIN_LOG_LEVEL": "info",
}

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of one process (all its threads), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in first]
    idle = ticks[3] + ticks[4]
    total = sum(ticks[:8])
    return (total - idle) / CLOCK_TICK, total / CLOCK_TICK


@dataclass
class CpuWindow:
    """CPU used by named processes (and the whole machine) between start() and stop()."""

    pids: dict[str, list[int]]
    _start: dict[str, float] = field(default_factory=dict)
    _machine: tuple[float, float] = (0.0, 0.0)
    _wall: float = 0.0

    def _sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pids in self.pids.items():
            out[name] = sum(process_cpu_seconds(pid) or 0.0 for pid in pids)
        return out

    def start(self) -> None:
        self._start = self._sample()
        self._machine = machine_cpu_seconds()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, Any]:
        end = self._sample()
        busy, total = machine_cpu_seconds()
        wall = time.monotonic() - self._wall
        used = {name: end[name] - self._start[name] for name in end}
        machine_busy = busy - self._machine[0]
        return {
            "wall_seconds": round(wall, 3),
            # CPU-seconds per wall-second: 1.0 is one core fully busy (this machine has
            # os.cpu_count() of them).
            "cores_used": {name: round(v / wall, 3) for name, v in used.items()},
            "machine_cores_busy": round(machine_busy / wall, 3),
            "others_cores_busy": round((machine_busy - sum(used.values())) / wall, 3),
            "machine_cores": round((total - self._machine[1]) / wall, 2),
        }


@contextmanager
def mosquitto(workdir: Path) -> Iterator[Mosquitto]:
    (workdir / "mosquitto").mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(workdir / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class Database:
    """Where the server under test keeps its data, and a direct reader for it."""

    kind: str  # "sqlite" | "postgresql"
    url: str  # for INSERTCOIN_DATABASE_URL
    sqlite_path: Path | None = None
    schema: str | None = None
    application_name: str | None = None

    def _connect(self) -> Any:
        if self.sqlite_path is not None:
            return sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=30)
        conn = psycopg.connect(PG_URL, autocommit=True)
        conn.execute(f'SET search_path TO "{self.schema}"')
        return conn

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            if self.sqlite_path is not None:
                sql = sql.replace("%s", "?")
            rows: list[tuple[Any, ...]] = list(conn.execute(sql, params).fetchall())
            return rows
        finally:
            conn.close()

    def server_backend_pids(self) -> list[int]:
        """PostgreSQL backends serving the server under test (by application_name)."""
        if self.application_name is None:
            return []
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (self.application_name,),
            ).fetchall()
        return [row[0] for row in rows]

    def pending(self) -> int:
        return int(self.query("SELECT count(*) FROM grants WHERE state = 'pending'")[0][0])


def to_unix(value: datetime | str) -> float:
    """A naive-UTC timestamp as stored by the server (SQLite gives text) → Unix time."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC).timestamp()


@contextmanager
def database(kind: str, workdir: Path) -> Iterator[Database]:
    if kind == "sqlite":
        path = workdir / "insertcoin.db"
        yield Database(kind, f"sqlite:///{path}", sqlite_path=path)
        return
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    app_name = f"insertcoin-{schema}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield Database(
            kind,
            f"{PG_URL}?options=-csearch_path%3D{schema}&application_name={app_name}",
            schema=schema,
            application_name=app_name,
        )
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def http_status(port: int, path: str = "/status", timeout: float = 1.0) -> int | None:
    """One plain GET on a fresh connection; None if nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


class ServerProcess:
    """`python -m insertcoin serve` on a free port, its output in a log file."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = {**os.environ, **SERVER_ENV, **env}
        self.log_path = workdir / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for `/status` 200; returns the seconds that took."""
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "insertcoin", "serve", "--port", str(self.port)],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=log,
            )
        while http_status(self.port) != 200:
            if self.process.poll() is not None or time.monotonic() - started > timeout:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server did not start; {self.log_path}:\n{tail}")
            time.sleep(0.01)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_lines(self) -> int:
        with self.log_path.open("rb") as log:
            return sum(1 for _ in log)


class AckerProcess:
    """`python -m bench.acker` as a child; stop() returns what it recorded."""

    def __init__(self, broker_url: str, prefix: str, workdir: Path) -> None:
        self.records = workdir / f"acker-{uuid.uuid4().hex[:6]}.json"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.acker", broker_url, prefix, str(self.records)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.process.kill()
            raise RuntimeError(f"acker did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> dict[str, Any]:
        stdin: IO[bytes] | None = self.process.stdin
        assert stdin is not None
        stdin.close()
        self.process.wait(30)
        data: dict[str, Any] = orjson.loads(self.records.read_bytes())
        return data
