"""What a benchmark run stands on: a private Mosquitto, a fresh database, the server as a
child process (`python -m insertcoin serve`), the acker process, direct database reads,
and CPU accounting per process from /proc."""

import http.client
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import psycopg
from tests.support import server as support_server
from tests.support.services import PG_URL, Mosquitto

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


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU so far, per name, summed over its processes."""
    return {
        name: sum(process_cpu_seconds(pid) or 0.0 for pid in group) for name, group in pids.items()
    }


def process_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process; (0, 0) if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLOCK_TICK, int(fields[12]) / CLOCK_TICK


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over the process's threads."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in first]
    idle = ticks[3] + ticks[4]
    total = sum(ticks[:8])
    return (total - idle) / CLOCK_TICK, total / CLOCK_TICK


class CpuWindow:
    """CPU used by named processes (and the whole machine) between start() and stop().

    `backends`, if given, lists (pid, started_at) of short-lived helpers (PostgreSQL
    backends of the server's pool): sampled every 0.2 s, so connections opened during
    the window are counted too (from their birth), and how many were opened."""

    def __init__(
        self,
        pids: dict[str, list[int]],
        backends: Callable[[], list[tuple[int, float]]] | None = None,
        detail: int | None = None,
    ) -> None:
        self.pids = pids
        self._detail = detail  # one pid whose user/system split and switches to report
        self._detail_start: tuple[float, float, int, int] = (0.0, 0.0, 0, 0)
        self._backends = backends
        self._start: dict[str, float] = {}
        self._machine = (0.0, 0.0)
        self._wall = 0.0
        self._since = 0.0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._born = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> dict[str, float]:
        return cpu_seconds(self.pids)

    def _sample_backends(self) -> None:
        assert self._backends is not None
        for pid, started_at in self._backends():
            cpu = process_cpu_seconds(pid)
            if cpu is None:
                continue
            if pid not in self._first:
                born = started_at >= self._since
                self._born += born
                self._first[pid] = 0.0 if born else cpu
            self._last[pid] = cpu

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self._sample_backends()

    def _sample_detail(self) -> tuple[float, float, int, int]:
        assert self._detail is not None
        return (*process_cpu_split(self._detail), *context_switches(self._detail))

    def start(self) -> None:
        if self._detail is not None:
            self._detail_start = self._sample_detail()
        self._start = self._sample()
        self._machine = machine_cpu_seconds()
        self._wall = time.monotonic()
        self._since = time.time()
        if self._backends is not None:
            self._sample_backends()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()

    def stop(self) -> dict[str, Any]:
        end = self._sample()
        busy, total = machine_cpu_seconds()
        wall = time.monotonic() - self._wall
        used = {name: end[name] - self._start[name] for name in end}
        extra: dict[str, Any] = {}
        if self._detail is not None:
            now = self._sample_detail()
            delta = [b - a for a, b in zip(self._detail_start, now, strict=True)]
            extra["detail_process"] = {
                "user_cores": round(delta[0] / wall, 3),
                "system_cores": round(delta[1] / wall, 3),
                "voluntary_switches_per_second": round(delta[2] / wall),
                "involuntary_switches_per_second": round(delta[3] / wall),
            }
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample_backends()
            used["postgresql_backends"] = sum(self._last[p] - self._first[p] for p in self._last)
            extra["postgresql_backends_seen"] = len(self._last)
            extra["postgresql_connections_opened"] = self._born
        machine_busy = busy - self._machine[0]
        return {
            "wall_seconds": round(wall, 3),
            # CPU-seconds per wall-second: 1.0 is one core fully busy.
            "cores_used": {name: round(v / wall, 3) for name, v in used.items()},
            "machine_cores_busy": round(machine_busy / wall, 3),
            "others_cores_busy": round((machine_busy - sum(used.values())) / wall, 3),
            "machine_cores": round((total - self._machine[1]) / wall, 2),
            **extra,
        }


NODELAY_SITE = Path(__file__).resolve().parent / "nodelay"


def nodelay_env() -> dict[str, str]:
    """Environment that makes a Python child set TCP_NODELAY on its TCP connections."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{NODELAY_SITE}{os.pathsep}{path}" if path else str(NODELAY_SITE)}


@contextmanager
def mosquitto(workdir: Path, *, nodelay: bool = False) -> Iterator[Mosquitto]:
    (workdir / "mosquitto").mkdir(parents=True, exist_ok=True)
    extra = "allow_anonymous true\n" + ("set_tcp_nodelay true\n" if nodelay else "")
    broker = Mosquitto(workdir / "mosquitto", extra_config=extra)
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
    _monitor: Any = None

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

    def server_backends(self) -> list[tuple[int, float]]:
        """(pid, started_at) of the PostgreSQL backends serving the server under test."""
        if self.application_name is None:
            return []
        if self._monitor is None:
            self._monitor = psycopg.connect(PG_URL, autocommit=True)
        rows = self._monitor.execute(
            "SELECT pid, extract(epoch FROM backend_start)::float8 FROM pg_stat_activity"
            " WHERE application_name = %s",
            (self.application_name,),
        ).fetchall()
        return [(int(pid), float(started)) for pid, started in rows]

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
    db = Database(
        kind,
        f"{PG_URL}?options=-csearch_path%3D{schema}&application_name={app_name}",
        schema=schema,
        application_name=app_name,
    )
    try:
        yield db
    finally:
        if db._monitor is not None:
            db._monitor.close()
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


class ServerProcess(support_server.ServerProcess):
    """`python -m insertcoin serve [--workers N]` on a free port with production-like
    timings, its output in a log file."""

    def __init__(
        self, workdir: Path, env: dict[str, str], workers: int = 1, python: str = sys.executable
    ) -> None:
        args = ("--workers", str(workers)) if workers > 1 else ()
        super().__init__(env, workdir, base_env=SERVER_ENV, args=args, interpreter=(python,))
        self.workers = workers

    def serving_pids(self) -> list[int]:
        """The processes serving requests: this one, or with --workers its workers."""
        return self.worker_pids() if self.workers > 1 else [self.pid]

    def all_pids(self) -> list[int]:
        """Every process of the server, for CPU and memory accounting."""
        return [self.pid, *self.worker_pids()] if self.workers > 1 else [self.pid]

    def start(self, timeout: float = 60.0) -> float:
        return super().start(timeout)

    def log_summary(self, samples: int = 10) -> dict[str, Any]:
        """Count the server's structured log lines by level and event; keep a few
        warnings and errors verbatim."""
        events: Counter[str] = Counter()
        problems: list[str] = []
        other = 0
        with self.log.open("rb") as log:
            for line in log:
                try:
                    entry = orjson.loads(line)
                    level, event = entry.get("level", "?"), entry.get("event", "?")
                except (orjson.JSONDecodeError, AttributeError):
                    other += 1
                    continue
                events[f"{level}:{event}"] += 1
                if level in ("warning", "error", "critical") and len(problems) < samples:
                    problems.append(line.decode(errors="replace").strip()[:500])
        return {"events": dict(events.most_common()), "other_lines": other, "problems": problems}


class AckerProcess:
    """`python -m bench.acker` as a child; stop() returns what it recorded."""

    def __init__(
        self,
        broker_url: str,
        prefix: str,
        workdir: Path,
        env: dict[str, str] | None = None,
        *,
        watch_acks: bool = False,
    ) -> None:
        self.records = workdir / f"acker-{uuid.uuid4().hex[:6]}.json"
        command = [sys.executable, "-m", "bench.acker", broker_url, prefix, str(self.records)]
        self.process = subprocess.Popen(
            [*command, "--watch-acks"] if watch_acks else command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, **(env or {})},
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
