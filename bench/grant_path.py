"""Where one grant's server time goes, piece by piece, in one process with nothing else
running: the same objects `insertcoin serve` wires up (Runtime, the FastAPI app), timed
directly instead of through HTTP and load.

    uv run python -m bench.grant_path [--databases sqlite,postgresql] [--count 300]
                                      [--out bench/results/grant_path.json]

Each step is timed `count` times: wall p50 (µs) and CPU per call (µs, whole process, so
work handed to other threads — paho's network thread, the threadpool — is included).
The ASGI rows call the app object directly (no socket, no uvicorn HTTP parsing), so
`ASGI POST credits` minus `ASGI GET /docs` is what the grant route adds to a trivial
request.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import insert, select, text

from bench.services import ADMIN_TOKEN, database, mosquitto
from bench.stats import table
from insertcoin.logs import configure as configure_logs
from insertcoin.protocol.messages import Ack, CoinPulse, dump_message
from insertcoin.protocol.topics import TopicKind
from insertcoin.server.app import create_app
from insertcoin.server.cabinets.models import CabinetCreate
from insertcoin.server.delivery.events import decode
from insertcoin.server.delivery.grants import GrantRequest
from insertcoin.server.runtime import Runtime
from insertcoin.server.settings import load_settings
from insertcoin.server.store import history
from insertcoin.server.store.tables import cabinets

PREFIX = "bench/path"


def _measure(fn: Callable[[int], Any], count: int) -> dict[str, float]:
    for i in range(min(20, count)):  # warm caches (SQLAlchemy compiled cache, models)
        fn(-1 - i)
    walls = []
    cpu_start = time.process_time()
    for i in range(count):
        start = time.perf_counter()
        fn(i)
        walls.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu_start
    return {
        "wall_p50_us": round(statistics.median(walls) * 1e6, 1),
        "wall_mean_us": round(statistics.fmean(walls) * 1e6, 1),
        "cpu_per_call_us": round(cpu / count * 1e6, 1),
    }


def _quiet_logs() -> None:
    """The server's own log configuration (JSON lines), written to /dev/null for the
    whole process (structlog caches each logger's file on first use)."""
    saved = sys.stderr
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - open for the process's lifetime
    try:
        configure_logs("info")
    finally:
        sys.stderr = saved


class _Asgi:
    """Call the FastAPI app object directly, as uvicorn would after parsing HTTP: all
    calls inside one long-lived task, as under uvicorn (anyio's worker threads live as
    long as the task that started them)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def _call(self, method: str, path: str, body: bytes) -> int:
        headers = [
            (b"host", b"127.0.0.1"),
            (b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        status = [0]

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]

        await self.app(scope, receive, send)
        return status[0]

    def measure(self, method: str, path: str, count: int, body: bytes = b"") -> dict[str, float]:
        async def run() -> dict[str, float]:
            for _ in range(20):
                await self._call(method, path, body)
            walls = []
            cpu_start = time.process_time()
            for _ in range(count):
                start = time.perf_counter()
                status = await self._call(method, path, body)
                walls.append(time.perf_counter() - start)
                assert status < 400, f"{method} {path}: {status}"
            cpu = time.process_time() - cpu_start
            return {
                "wall_p50_us": round(statistics.median(walls) * 1e6, 1),
                "wall_mean_us": round(statistics.fmean(walls) * 1e6, 1),
                "cpu_per_call_us": round(cpu / count * 1e6, 1),
            }

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(run())


def _loop_factory() -> Any:
    try:
        import uvloop  # noqa: PLC0415

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        return None


def run_database(kind: str, count: int, workdir: Path) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    with mosquitto(workdir) as broker, database(kind, workdir) as db:
        settings = load_settings(
            database_url=db.url,
            mqtt_url=broker.url,
            mqtt_topic_prefix=PREFIX,
            admin_token=ADMIN_TOKEN,
            # Nothing is acked here: keep the dispatcher from re-sending during the run.
            retry_initial_seconds=3600,
            retry_max_seconds=3600,
            credit_ttl_seconds=7200,
        )
        runtime = Runtime(settings)
        runtime.start()
        try:
            rows.update(_steps(runtime, count))
        finally:
            runtime.stop()
    return rows


def _steps(runtime: Runtime, count: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    registry, delivery, rdb = runtime.registry, runtime.delivery, runtime.db
    for i in range(4):
        registry.create(
            CabinetCreate.model_validate(
                {"machineId": f"cab{i:02d}", "name": "x", "price": {"amount": 1, "currency": "usd"}}
            )
        )
    now = datetime.now(UTC)
    topics = runtime.topics

    def empty_write(_: int) -> None:
        with rdb.write():
            pass

    def select_one(_: int) -> None:
        with rdb.read() as conn:
            conn.execute(text("SELECT 1"))

    def select_cabinet(_: int) -> None:
        with rdb.read() as conn:
            conn.execute(select(cabinets.c.enabled).where(cabinets.c.machine_id == "cab00")).first()

    def build_insert(_: int) -> None:
        insert(cabinets).values(machine_id="x", name="y")  # statement construction only

    def history_row(i: int) -> None:
        with rdb.write() as conn:
            history.record(
                conn, subject="bench", subject_id=f"h{i}", machine_id=None, event="e", at=now
            )

    def create_only(_: int) -> None:
        with rdb.write() as conn:
            delivery.create(conn, GrantRequest("cab00", 1, "comp", "bench"))

    pulse = CoinPulse(
        machine_id="cab00",
        credits=1,
        timestamp=now,
        credit_id="cr_" + "0" * 32,
        expires_at=now + timedelta(minutes=2),
    )
    topic = topics.topic("cab00", TopicKind.COINPULSE)
    payload = dump_message(pulse)

    log = structlog.get_logger("bench")
    rows["transaction: BEGIN + COMMIT, nothing in it"] = _measure(empty_write, count)
    rows["read: SELECT 1 (pool checkout + query)"] = _measure(select_one, count)
    rows["read: SELECT cabinet.enabled"] = _measure(select_cabinet, count)
    rows["SQLAlchemy: build insert().values() only"] = _measure(build_insert, count)
    rows["transaction: one history INSERT"] = _measure(history_row, count)
    rows["transaction: grants.create (no publish)"] = _measure(create_only, count)
    rows["CoinPulse(...) + dump_message"] = _measure(
        lambda _: dump_message(
            CoinPulse(
                machine_id="cab00",
                credits=1,
                timestamp=now,
                credit_id=pulse.credit_id,
                expires_at=pulse.expires_at,
            )
        ),
        count,
    )
    rows["paho publish QoS1 (call only)"] = _measure(
        lambda _: runtime.link.publish(topic, payload), count
    )
    rows["structlog info line (JSON, to /dev/null)"] = _measure(
        lambda i: log.info("grant_created", machineId="cab00", creditId=i, credits=1), count
    )
    rows["DeliveryService.comp (txn + publish)"] = _measure(
        lambda _: delivery.comp("cab00", 1, "bench").result(), count
    )

    # Acks: settle grants made for the purpose, one per handle() and 32 per handle().
    def make(n: int) -> list[str]:
        return [delivery.comp(f"cab{i % 4:02d}", 1, "bench").result().credit_id for i in range(n)]

    def ack(credit_id: str, machine_id: str) -> bytes:
        return dump_message(
            Ack(
                machine_id=machine_id,
                credit_id=credit_id,
                result="applied",
                timestamp=datetime.now(UTC),
            )
        )

    singles = make(count + 20)
    ack_topic = topics.topic("cab00", TopicKind.ACK)
    rows["decode ack (topic + msgspec)"] = _measure(
        lambda i: decode(topics, ack_topic, ack(singles[i], "cab00")), count
    )
    messages = [
        decode(topics, topics.topic(f"cab{i % 4:02d}", TopicKind.ACK), ack(cid, f"cab{i % 4:02d}"))
        for i, cid in enumerate(singles)
    ]
    rows["CabinetEvents.handle, 1 ack"] = _measure(
        lambda i: runtime.events.handle([messages[i if i >= 0 else count - i - 1]]), count
    )
    batch_count = max(5, count // 32)
    batched = make(32 * (batch_count + 20))
    batch_msgs = [
        decode(topics, topics.topic(f"cab{i % 4:02d}", TopicKind.ACK), ack(cid, f"cab{i % 4:02d}"))
        for i, cid in enumerate(batched)
    ]

    def handle_batch(i: int) -> None:
        j = i if i >= 0 else batch_count - i - 1
        runtime.events.handle(batch_msgs[32 * j : 32 * (j + 1)])

    per_batch = _measure(handle_batch, batch_count)
    rows["CabinetEvents.handle, 32 acks (per ack)"] = {
        k: round(v / 32, 1) for k, v in per_batch.items()
    }

    app = create_app(runtime.settings, runtime)
    app.state.runtime = runtime
    asgi = _Asgi(app)
    body = b'{"credits":1,"reason":"bench"}'
    rows["ASGI GET /docs (trivial)"] = asgi.measure("GET", "/docs", count)
    rows["ASGI GET /status"] = asgi.measure("GET", "/status", count)
    rows["ASGI POST /api/cabinets/cab00/credits"] = asgi.measure(
        "POST", "/api/cabinets/cab00/credits", count, body
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results/grant_path.json"))
    args = parser.parse_args()
    _quiet_logs()
    results: dict[str, Any] = {
        "benchmark": "grant_path",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "count": args.count,
        "load_average_before": os.getloadavg(),
        "runs": {},
    }
    for kind in [k.strip() for k in args.databases.split(",") if k.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"bench-path-{kind}-") as tmp:
            results["runs"][kind] = run_database(kind, args.count, Path(tmp))
    results["load_average_after"] = os.getloadavg()
    runs = results["runs"]
    names = list(runs)
    steps = list(next(iter(runs.values())))
    headers = ["step (µs)"] + [f"{n} {m}" for n in names for m in ("wall p50", "cpu/call")]
    body = [
        [step]
        + [
            v
            for n in names
            for v in (runs[n][step]["wall_p50_us"], runs[n][step]["cpu_per_call_us"])
        ]
        for step in steps
    ]
    print(table(headers, body))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
