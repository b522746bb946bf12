"""Credit delivery benchmark: comp grant API call → `coinpulse` received → ack → grant
`applied`, through a private Mosquitto, on SQLite and on PostgreSQL.

    uv run python -m bench.delivery [--seconds 20] [--databases sqlite,postgresql]
                                    [--out bench/results/delivery.json] [--profile DIR]

For each database: a fresh store, a private Mosquitto and `python -m insertcoin serve` as
a child process, 32 registered cabinets played by one acking paho process
(`bench.acker`). Measured, with baselines from the same run on the same machine:

(a) concurrency 1, 300 grants: p50/p99 of call start → coinpulse received by the cabinet,
    and → grant `applied` (the history entry's `at`, read from the database afterwards;
    every clock here is the same machine's UTC wall clock);
(b) concurrency 32 for `--seconds`: grants/s applied (from the database, after a drain),
    with lost = created - applied, which must be 0.

Baselines: bare paho QoS 1 publish → receive through the same broker; GET of a trivial
route (`/docs`: static HTML, no database, no auth) and of `/status` (one `SELECT 1`) on
the same server; an fsync on the same disk; the load generator's own ceiling against a
bare ASGI app under uvicorn; the acker's own ceiling.
"""

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from tests.support.server import UNUSED_STRIPE
from tests.support.services import free_port

from bench import load, runs
from bench.broker import acker_ceiling, paho_round_trip
from bench.services import (
    ADMIN_TOKEN,
    SERVER_ENV,
    AckerProcess,
    CpuWindow,
    Database,
    ServerProcess,
    database,
    http_status,
    mosquitto,
    nodelay_env,
    to_unix,
)
from bench.stats import fmt, latency_ms, ratio, table

CABINETS = 32
PREFIX = "bench/machine"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
GRANT_BODY = b'{"credits":1,"reason":"bench"}'
TARGET_DELTA_MS = 3.0
TARGET_GRANTS_PER_SECOND = 1000.0


def _cabinet_ids() -> list[str]:
    return [f"cab{i:02d}" for i in range(CABINETS)]


def fsync_baseline(directory: Path, count: int = 200) -> dict[str, Any]:
    """Append 200 bytes and fsync, on the disk the SQLite file lives on."""
    path = directory / "fsync.probe"
    samples = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fsync(fd)
            samples.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return latency_ms(samples)


def client_ceiling(seconds: float, concurrency: int) -> dict[str, Any]:
    """The load generator against the most trivial ASGI app under uvicorn (httptools,
    uvloop), with the same POST as a grant: anything the server does beyond this, the
    client cannot show."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.echo_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--lifespan",
            "off",
        ],
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        deadline = time.monotonic() + 30
        while http_status(port, "/") != 201:
            if time.monotonic() > deadline:
                raise RuntimeError("echo app did not start")
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/api/cabinets/cab00/credits"
        load.run(load.drive("POST", lambda _: url, concurrency=concurrency, count=200))
        cpu = CpuWindow({"client": [os.getpid()], "echo_server": [process.pid]})
        cpu.start()
        calls = load.run(
            load.drive(
                "POST",
                lambda _: url,
                concurrency=concurrency,
                seconds=seconds,
                body=GRANT_BODY,
                headers=ADMIN,
            )
        )
        usage = cpu.stop()
    finally:
        process.terminate()
        process.wait(10)
    return {
        **load.rate(calls, ok=201),
        "latency_ms": latency_ms(c.seconds for c in calls),
        "cpu": usage,
    }


def register_cabinets(server: ServerProcess) -> None:
    ids = _cabinet_ids()
    bodies = [
        orjson.dumps(
            {"machineId": m, "name": f"Bench {m}", "price": {"amount": 100, "currency": "usd"}}
        )
        for m in ids
    ]

    async def register() -> list[load.Call]:
        calls = []
        for body in bodies:
            calls += await load.drive(
                "POST",
                lambda _: f"{server.url}/api/cabinets",
                concurrency=1,
                count=1,
                body=body,
                headers=ADMIN,
            )
        return calls

    calls = load.run(register())
    bad = [c for c in calls if c.status != 201]
    if bad:
        raise RuntimeError(f"registering cabinets failed: {[c.status for c in bad]}")


def _grants(server: ServerProcess, *, concurrency: int, **kwargs: Any) -> list[load.Call]:
    ids = _cabinet_ids()
    return load.run(
        load.drive(
            "POST",
            lambda i: f"{server.url}/api/cabinets/{ids[i % CABINETS]}/credits",
            concurrency=concurrency,
            body=GRANT_BODY,
            headers=ADMIN,
            credit_ids=True,
            **kwargs,
        )
    )


def http_baselines(server: ServerProcess, count: int = 300) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in ("/docs", "/status", "/openapi.json"):
        url = server.url + path
        load.run(load.drive("GET", lambda _, url=url: url, concurrency=1, count=30))
        calls = load.run(load.drive("GET", lambda _, url=url: url, concurrency=1, count=count))
        out[path] = {
            "errors": sum(1 for c in calls if c.status != 200),
            **latency_ms(c.seconds for c in calls),
        }
    return out


def _drain(db: Database, timeout: float) -> tuple[float, int]:
    """Wait until no grant is pending; (seconds waited, still pending)."""
    start = time.monotonic()
    while True:
        pending = db.pending()
        if pending == 0 or time.monotonic() - start > timeout:
            return time.monotonic() - start, pending
        time.sleep(0.2)


def _db_facts(db: Database) -> dict[str, dict[str, Any]]:
    """Per creditId: state, attempts, created/applied Unix times, number of 'applied'."""
    facts: dict[str, dict[str, Any]] = {}
    for credit_id, state, attempts, created_at in db.query(
        "SELECT credit_id, state, attempts, created_at FROM grants"
    ):
        facts[credit_id] = {
            "state": state,
            "attempts": attempts,
            "created": to_unix(created_at),
            "applied": None,
            "applied_events": 0,
        }
    for credit_id, at in db.query(
        "SELECT subject_id, at FROM history WHERE subject = 'grant' AND event = 'applied'"
    ):
        fact = facts.setdefault(credit_id, {"state": "?", "applied": None, "applied_events": 0})
        fact["applied_events"] += 1
        if fact["applied"] is None:
            fact["applied"] = to_unix(at)
    return facts


def _first_received(records: dict[str, Any]) -> tuple[dict[str, float], Counter[str]]:
    first: dict[str, float] = {}
    seen: Counter[str] = Counter()
    for credit_id, at in records["received"]:
        seen[credit_id] += 1
        first.setdefault(credit_id, at)
    return first, seen


def _profile(pid: int, out: Path, gil: bool) -> subprocess.Popen[bytes] | None:
    """py-spy the server until _end_profile(); raw collapsed stacks with thread names."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("  (py-spy not installed: `uv pip install py-spy`; profiling skipped)")
        return None
    command = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--nonblocking",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    if gil:
        command.append("--gil")
    spying = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attach before the phase starts
    return spying


def _end_profile(spying: subprocess.Popen[bytes] | None) -> None:
    if spying is not None:
        spying.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        spying.wait(60)


def run_database(
    kind: str, workers: int, args: argparse.Namespace, workdir: Path, client: dict[str, Any]
) -> dict[str, Any]:
    result: dict[str, Any] = {"database": kind, "workers": workers}
    nodelay = set(args.nodelay.split(",")) - {"none", ""}
    if "all" in nodelay:
        nodelay = {"broker", "server", "acker"}
    server_env = nodelay_env() if "server" in nodelay else {}
    acker_env = nodelay_env() if "acker" in nodelay else {}
    with (
        mosquitto(workdir, nodelay="broker" in nodelay) as broker,
        database(kind, workdir) as db,
    ):
        print(f"\n== {runs.label(kind, workers)}: broker {broker.url}, workdir {workdir}")
        result["acker_ceiling"] = acker_ceiling(broker.url, workdir, env=acker_env)
        print(f"  acker ceiling: {result['acker_ceiling']}")
        server = ServerProcess(
            workdir,
            {
                "INSERTCOIN_DATABASE_URL": db.url,
                "INSERTCOIN_MQTT_URL": broker.url,
                "INSERTCOIN_MQTT_TOPIC_PREFIX": PREFIX,
                **server_env,
                **(UNUSED_STRIPE if workers > 1 else {}),
                **dict(item.split("=", 1) for item in args.server_env),
            },
            workers,
            args.server_python,
        )
        result["server_start_seconds"] = round(server.start(), 3)
        acker: AckerProcess | None = None
        try:
            register_cabinets(server)
            acker = AckerProcess(
                broker.url, PREFIX, workdir, env=acker_env, watch_acks=args.watch_acks
            )
            warm = _grants(server, concurrency=1, count=30)
            warm += _grants(server, concurrency=CABINETS, count=300)
            _drain(db, 30)

            result["baseline_paho_ms"] = paho_round_trip(broker.url)
            result["baseline_http_ms"] = http_baselines(server)
            result["baseline_fsync_ms"] = fsync_baseline(workdir)
            docs = load.run(
                load.drive(
                    "GET",
                    lambda _: server.url + "/docs",
                    concurrency=CABINETS,
                    seconds=min(5.0, args.seconds),
                )
            )
            result["server_trivial_route_c32"] = load.rate(docs)
            http = result["baseline_http_ms"].items()
            print(
                f"  paho p50 {result['baseline_paho_ms']['p50']} ms; http "
                + ", ".join(f"{p} p50 {v['p50']} ms" for p, v in http)
                + f"; /docs at c=32: {result['server_trivial_route_c32']['per_second']}/s"
            )

            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            spy = (
                _profile(server.serving_pids()[0], args.profile / f"server-{kind}-c1.txt", args.gil)
                if args.profile
                else None
            )
            serial = _grants(server, concurrency=1, count=args.grants)
            _end_profile(spy)
            print(f"  c=1: {len(serial)} grants in {serial[-1].end - serial[0].start:.1f} s")

            pids = {
                "server": server.all_pids(),
                "mosquitto": [broker.process.pid] if broker.process else [],
                "acker": [acker.pid],
                "client": [os.getpid()],
            }
            detail = server.serving_pids()[0]
            cpu = CpuWindow(
                pids, db.server_backends if kind == "postgresql" else None, detail=detail
            )
            spy = None
            if args.profile:
                spy = _profile(detail, args.profile / f"server-{kind}-c32.txt", args.gil)
            cpu.start()
            sustained = _grants(server, concurrency=args.concurrency, seconds=args.seconds)
            usage = cpu.stop()
            _end_profile(spy)
            load_end = max(c.end for c in sustained)
            pending_at_end = db.pending()
            drained, still_pending = _drain(db, args.drain)
            print(
                f"  c={args.concurrency}: {len(sustained)} calls in {args.seconds} s, "
                f"{pending_at_end} pending at the end, drained in {drained:.1f} s"
            )
        finally:
            records = acker.stop() if acker is not None else {"received": []}
            server.stop()
        result["server_log"] = server.log_summary()
        facts = _db_facts(db)

    received, receptions = _first_received(records)
    result["acker_cpu_seconds"] = records.get("cpu_seconds")
    result["serial"] = _serial_figures(serial, received, facts)
    result["sustained"] = _sustained_figures(
        sustained, received, receptions, facts, load_end, pending_at_end, drained, still_pending
    )
    result["sustained"]["cpu"] = usage
    if args.watch_acks:
        seen = dict(reversed(records.get("acks_seen", [])))  # first sighting wins
        result["sustained"]["grant_to_ack_seen_at_broker_ms"] = latency_ms(
            seen[c.credit_id] - c.start for c in sustained if c.credit_id in seen
        )
        result["serial"]["grant_to_ack_seen_at_broker_ms"] = latency_ms(
            seen[c.credit_id] - c.start for c in serial if c.credit_id in seen
        )
    known = {c.credit_id for c in [*warm, *serial, *sustained] if c.credit_id}
    result["orphans"] = sum(1 for cid in facts if cid not in known)
    result["summary"] = _summary(result, client["per_second"])
    return result


def _serial_figures(
    calls: list[load.Call], received: dict[str, float], facts: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    ok = [c for c in calls if c.credit_id]
    to_pulse = [received[c.credit_id] - c.start for c in ok if c.credit_id in received]
    to_applied = [
        facts[c.credit_id]["applied"] - c.start
        for c in ok
        if facts.get(c.credit_id, {}).get("applied")
    ]
    inside = [
        facts[c.credit_id]["applied"] - facts[c.credit_id]["created"]
        for c in ok
        if facts.get(c.credit_id, {}).get("applied")
    ]
    return {
        "grants": len(calls),
        "errors": len(calls) - len(ok),
        "api_call_ms": latency_ms(c.seconds for c in ok),
        "grant_to_coinpulse_ms": latency_ms(to_pulse),
        # Positive: the coinpulse reached the cabinet after the API response was read.
        "response_to_coinpulse_ms": latency_ms(
            received[c.credit_id] - c.end for c in ok if c.credit_id in received
        ),
        "grant_to_applied_ms": latency_ms(to_applied),
        "server_created_to_applied_ms": latency_ms(inside),
    }


def _sustained_figures(
    calls: list[load.Call],
    received: dict[str, float],
    receptions: Counter[str],
    facts: dict[str, dict[str, Any]],
    load_end: float,
    pending_at_end: int,
    drained: float,
    still_pending: int,
) -> dict[str, Any]:
    start = min(c.start for c in calls)
    span = load_end - start
    created = [c for c in calls if c.credit_id]
    ids = [c.credit_id for c in created if c.credit_id]
    states = Counter(facts.get(cid, {}).get("state", "missing") for cid in ids)
    applied_at = [facts[cid]["applied"] for cid in ids if facts.get(cid, {}).get("applied")]
    last_applied = max(applied_at) if applied_at else start
    applied_in_window = sum(1 for at in applied_at if at <= load_end)
    return {
        "seconds": round(span, 3),
        "calls": len(calls),
        "created": len(created),
        "errors": dict(Counter(c.status for c in calls if not c.credit_id)),
        "states_after_drain": dict(states),
        "applied": len(applied_at),
        "lost": len(created) - len(applied_at),
        "applied_twice": sum(1 for cid in ids if facts.get(cid, {}).get("applied_events", 0) > 1),
        "resent": sum(1 for cid in ids if facts.get(cid, {}).get("attempts", 1) > 1),
        "coinpulse_received_more_than_once": sum(1 for cid in ids if receptions[cid] > 1),
        "created_per_second": round(len(created) / span, 1),
        # Headline: every created grant counted once applied, over the time from the
        # first call to the last `applied`, so a backlog left at the end counts against it.
        "applied_per_second": round(len(applied_at) / (last_applied - start), 1),
        "applied_in_window_per_second": round(applied_in_window / span, 1),
        "pending_at_load_end": pending_at_end,
        "drain_seconds": round(drained, 2),
        "pending_after_drain": still_pending,
        "api_call_ms": latency_ms(c.seconds for c in created),
        "grant_to_coinpulse_ms": latency_ms(
            received[c.credit_id] - c.start for c in created if c.credit_id in received
        ),
        "grant_to_applied_ms": latency_ms(
            facts[c.credit_id]["applied"] - c.start
            for c in created
            if facts.get(c.credit_id, {}).get("applied")
        ),
    }


def _summary(r: dict[str, Any], client_per_second: float | None) -> dict[str, Any]:
    paho = r["baseline_paho_ms"]["p50"]
    trivial = r["baseline_http_ms"]["/docs"]["p50"]
    status = r["baseline_http_ms"]["/status"]["p50"]
    pulse = r["serial"]["grant_to_coinpulse_ms"].get("p50")
    applied_rate = r["sustained"]["applied_per_second"]
    return {
        "grant_to_coinpulse_p50_ms": pulse,
        "baseline_sum_p50_ms": round(paho + trivial, 3),
        "delta_ms": round(pulse - paho - trivial, 3) if pulse is not None else None,
        "delta_vs_status_route_ms": round(pulse - paho - status, 3) if pulse is not None else None,
        "delta_target_ms": TARGET_DELTA_MS,
        "delta_met": pulse is not None and pulse - paho - trivial <= TARGET_DELTA_MS,
        "grant_to_coinpulse_over_baseline_sum": ratio(pulse, paho + trivial),
        "applied_per_second": applied_rate,
        "applied_per_second_target": TARGET_GRANTS_PER_SECOND,
        "applied_per_second_met": applied_rate >= TARGET_GRANTS_PER_SECOND
        and r["sustained"]["lost"] == 0,
        "applied_over_target": ratio(applied_rate, TARGET_GRANTS_PER_SECOND),
        "applied_over_trivial_route_c32": ratio(
            applied_rate, r["server_trivial_route_c32"]["per_second"]
        ),
        "applied_over_client_ceiling": ratio(applied_rate, client_per_second),
        "lost": r["sustained"]["lost"],
    }


def _get(run: dict[str, Any], path: str) -> Any:
    value: Any = run
    for key in path.split(":"):
        value = value[key]
    return value


def _pair(run: dict[str, Any], path: str) -> str:
    return f"{_get(run, path + ':p50'):.1f}/{_get(run, path + ':p99'):.1f}"


C = "c=N"  # the sustained phase (N = --concurrency, 32 unless changed)
# (label, dotted path into a run's result, or a function of the run)
_ROWS: list[tuple[str, Any]] = [
    ("acker ceiling, 1 core (msg/s)", "acker_ceiling:acker_single_core_ceiling_per_second"),
    ("acker end-to-end flood (ack/s)", "acker_ceiling:acks_per_second_end_to_end"),
    ("baseline paho QoS1 p50 (ms)", "baseline_paho_ms:p50"),
    ("baseline paho QoS1 p99 (ms)", "baseline_paho_ms:p99"),
    ("baseline GET /docs p50 (ms) [trivial]", "baseline_http_ms:/docs:p50"),
    ("baseline GET /docs p99 (ms)", "baseline_http_ms:/docs:p99"),
    ("baseline GET /status p50 (ms) [SELECT 1]", "baseline_http_ms:/status:p50"),
    ("baseline GET /openapi.json p50 (ms)", "baseline_http_ms:/openapi.json:p50"),
    ("baseline fsync p50 (ms)", "baseline_fsync_ms:p50"),
    ("c=1 API call p50 (ms)", "serial:api_call_ms:p50"),
    ("c=1 grant->coinpulse p50 (ms)", "serial:grant_to_coinpulse_ms:p50"),
    ("c=1 grant->coinpulse p99 (ms)", "serial:grant_to_coinpulse_ms:p99"),
    ("c=1 API response->coinpulse p50 (ms)", "serial:response_to_coinpulse_ms:p50"),
    ("c=1 grant->applied p50 (ms)", "serial:grant_to_applied_ms:p50"),
    ("c=1 grant->applied p99 (ms)", "serial:grant_to_applied_ms:p99"),
    ("c=1 server created->applied p50 (ms)", "serial:server_created_to_applied_ms:p50"),
    ("baseline sum paho+/docs p50 (ms)", "summary:baseline_sum_p50_ms"),
    ("delta = coinpulse p50 - sum (ms) [<= 3]", "summary:delta_ms"),
    ("delta using /status instead (ms)", "summary:delta_vs_status_route_ms"),
    ("ratio coinpulse p50 / baseline sum", "summary:grant_to_coinpulse_over_baseline_sum"),
    ("GET /docs at c=32 (req/s)", "server_trivial_route_c32:per_second"),
    (f"{C} grants created/s", "sustained:created_per_second"),
    (f"{C} grants APPLIED/s [>= 1000]", "sustained:applied_per_second"),
    ("  ratio to target 1000/s", "summary:applied_over_target"),
    ("  ratio to GET /docs at c=32", "summary:applied_over_trivial_route_c32"),
    ("  ratio to client ceiling", "summary:applied_over_client_ceiling"),
    (
        f"{C} created/applied/lost",
        lambda r: "/".join(str(r["sustained"][k]) for k in ("created", "applied", "lost")),
    ),
    (
        f"{C} applied twice/re-sent",
        lambda r: "/".join(str(r["sustained"][k]) for k in ("applied_twice", "resent")),
    ),
    (f"{C} HTTP errors", lambda r: r["sustained"]["errors"] or 0),
    (f"{C} pending at load end", "sustained:pending_at_load_end"),
    (f"{C} API call p50/p99 (ms)", lambda r: _pair(r, "sustained:api_call_ms")),
    (f"{C} grant->coinpulse p50/p99 (ms)", lambda r: _pair(r, "sustained:grant_to_coinpulse_ms")),
    (f"{C} grant->applied p50/p99 (ms)", lambda r: _pair(r, "sustained:grant_to_applied_ms")),
    (
        f"{C} grant->ack seen at broker p50/p99 (ms)",
        lambda r: _pair(r, "sustained:grant_to_ack_seen_at_broker_ms"),
    ),
    *[
        (f"  cores used: {proc}", f"sustained:cpu:cores_used:{proc}")
        for proc in ("server", "mosquitto", "acker", "client", "postgresql_backends")
    ],
    ("  PostgreSQL connections opened", "sustained:cpu:postgresql_connections_opened"),
    (
        "  server user / system cores",
        lambda r: "{user_cores}/{system_cores}".format(**r["sustained"]["cpu"]["detail_process"]),
    ),
    (
        "  server context switches/s vol/invol",
        lambda r: "{voluntary_switches_per_second}/{involuntary_switches_per_second}".format(
            **r["sustained"]["cpu"]["detail_process"]
        ),
    ),
    (
        "  server CPU ms per grant created",
        lambda r: round(
            r["sustained"]["cpu"]["cores_used"]["server"]
            * 1000
            / r["sustained"]["created_per_second"],
            2,
        ),
    ),
    ("  cores used: others on the machine", "sustained:cpu:others_cores_busy"),
]


def _print_report(report: dict[str, Any]) -> None:
    ceiling = report["client_ceiling"]
    print(
        f"\nLoad generator ceiling (aiohttp+uvloop, c={CABINETS}, POST to a bare ASGI app "
        f"under uvicorn): {fmt(ceiling['per_second'], 0)} req/s "
        f"(client {ceiling['cpu']['cores_used']['client']} cores, "
        f"echo server {ceiling['cpu']['cores_used']['echo_server']} cores)"
    )
    done = report["runs"]
    rows: list[list[Any]] = []
    sustained = f"c={report['settings']['concurrency']}"
    for template, how in _ROWS:
        label = template.replace("c=N", sustained)
        values = []
        for run in done.values():
            try:
                values.append(how(run) if callable(how) else _get(run, how))
            except (KeyError, TypeError):
                values.append(None)
        rows.append([label, *values])
    print()
    print(table(["", *done], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runs.add_arguments(parser, out="bench/results/delivery.json", drain=60.0, concurrency=CABINETS)
    parser.add_argument("--grants", type=int, default=300, help="grants at concurrency 1")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the server during the sustained phase into DIR"
    )
    parser.add_argument("--gil", action="store_true", help="with --profile: GIL holder only")
    parser.add_argument(
        "--watch-acks",
        action="store_true",
        help="diagnostics: the acker also subscribes to acks and records when each one "
        "comes back out of the broker (adds load to the acker and the broker)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server (repeatable), e.g. to try a setting",
    )
    parser.add_argument(
        "--nodelay",
        metavar="WHERE",
        # The deployment the docs recommend: `broker mosquitto-config` writes
        # set_tcp_nodelay, and cabinets set TCP_NODELAY (the server always does).
        default="broker,acker",
        help="TCP_NODELAY in any of broker (set_tcp_nodelay), server, acker, "
        "comma-separated, all, or none (default: broker,acker, as recommended)",
    )
    args = parser.parse_args()
    plan = runs.planned(parser, args)

    report: dict[str, Any] = {
        "benchmark": "delivery",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": os.getloadavg(),
        },
        "settings": {
            "cabinets": CABINETS,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "serial_grants": args.grants,
            "server_env": {k: v for k, v in SERVER_ENV.items() if k != "INSERTCOIN_ADMIN_TOKEN"},
            "profiled": bool(args.profile),
            "nodelay_experiment": args.nodelay,
            "server_env_extra": args.server_env,
            "server_python": args.server_python,
        },
        "notes": [
            "All latencies start at the client's time.time() just before the request.",
            "'applied' is the `at` of the grant's history entry 'applied', which the server "
            "stamps when it starts handling the listener batch holding the ack (before that "
            "batch commits).",
            "Trivial HTTP route = GET /docs (static HTML: no database, no auth, async route).",
        ],
        "runs": {},
    }
    started = time.monotonic()
    report["client_ceiling"] = client_ceiling(min(5.0, args.seconds), CABINETS)
    for kind, workers in plan:
        with tempfile.TemporaryDirectory(prefix=f"bench-delivery-{kind}-") as tmp:
            report["runs"][runs.label(kind, workers)] = run_database(
                kind, workers, args, Path(tmp), report["client_ceiling"]
            )
    report["machine"]["load_average_after"] = os.getloadavg()
    report["elapsed_seconds"] = round(time.monotonic() - started, 1)
    _print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['elapsed_seconds']} s)")


if __name__ == "__main__":
    main()
