"""Payments benchmark: signed webhook POST → `coinpulse` received → ack → capture →
purchase `credited`, through a private Mosquitto, with the Stripe stand-in (its own
process) as Stripe, on SQLite and on PostgreSQL.

    uv run python -m bench.payments [--seconds 20] [--serial 300]
                                    [--databases sqlite,postgresql]
                                    [--out bench/results/payments.json]

For each database: a fresh store, a private Mosquitto, the stand-in, and
`python -m insertcoin serve` in `stripe-test` mode pointed at it; 32 cabinets played by
one acking paho process (`bench.acker`). Paid Checkout Sessions are prepared on the
stand-in beforehand; the load generator then POSTs each one's
`checkout.session.completed` event, signed with the webhook secret, as Stripe would.
The server verifies it, stores it, answers 200, re-reads the session and its payment
from the stand-in, records purchase + grant, publishes; the acker acks; the server
captures.

(a) concurrency 1, `--serial` webhooks: p50/p99 of POST start → 200, → coinpulse
    received, → purchase `credited` (its history entry's `at`);
(b) concurrency 32 for `--seconds`: webhooks accepted/s (200s per second of the load),
    purchases credited/s (credited ÷ from first POST to last `credited`, after a drain),
    lost = accepted - credited (must be 0), and the server's RSS (now and peak).

Baselines as in `bench.delivery`: bare paho publish → receive, `GET /docs` on the same
server, an fsync, and the load generator's own ceiling.
"""

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import stripe
from tests.support.standin import API_KEY, WEBHOOK_SECRET, StandInProcess

from bench import load, runs
from bench.broker import paho_round_trip
from bench.delivery import (
    CABINETS,
    PREFIX,
    client_ceiling,
    fsync_baseline,
    http_baselines,
    register_cabinets,
)
from bench.services import (
    AckerProcess,
    CpuWindow,
    ServerProcess,
    cpu_seconds,
    database,
    mosquitto,
    to_unix,
)
from bench.stats import fmt, latency_ms, ratio, table

TARGET_ACCEPTED_PER_SECOND = 1000.0
TARGET_PULSE_P50_MS = 3.0
TARGET_CREDITED_PER_SECOND = 500.0
TARGET_RSS_MIB = 90.0
# Sessions prepared for the sustained phase: enough for this rate over `--seconds`.
PREPARED_RATE = 800


def _rss_mib(pids: list[int]) -> dict[str, float]:
    """RSS now and at its peak, of the largest of these processes (the target is per
    server process)."""
    now = peak = 0.0
    for pid in pids:
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
        now, peak = max(now, fields.get("VmRSS", 0.0)), max(peak, fields.get("VmHWM", 0.0))
    return {"now": now, "peak": peak}


def _prepare_sessions(standin: StandInProcess, count: int) -> list[str]:
    """Paid (authorized) Checkout Sessions, made as the server's /pay would make them."""
    client = standin.client()
    local = threading.local()

    def control() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=f"{standin.url}/_control", timeout=30)
        return local.client  # type: ignore[no-any-return]

    def one(i: int) -> str:
        machine_id = f"cab{i % CABINETS:02d}"
        session = client.v1.checkout.sessions.create(
            params={
                "mode": "payment",
                "line_items": [
                    {
                        "price_data": {
                            "currency": "usd",
                            "unit_amount": 100,
                            "product_data": {"name": f"1 credit on Bench {machine_id}"},
                        },
                        "quantity": 1,
                    }
                ],
                "client_reference_id": machine_id,
                "metadata": {"machine_id": machine_id},
                "payment_intent_data": {"metadata": {"machine_id": machine_id}},
                "payment_method_options": {"card": {"capture_method": "manual"}},
                "success_url": "http://127.0.0.1/done?session_id={CHECKOUT_SESSION_ID}",
                "cancel_url": "http://127.0.0.1/cancelled",
            }
        )
        paid = control().post(f"/sessions/{session.id}/pay", json={"card": "4242424242424242"})
        paid.raise_for_status()
        return str(session.id)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        sessions = list(pool.map(one, range(count)))
    print(f"  prepared {count} paid sessions in {time.monotonic() - started:.1f} s")
    return sessions


def _events(sessions: list[str], tag: str) -> list[bytes]:
    created = int(time.time())
    return [
        orjson.dumps(
            {
                "id": f"evt_bench_{tag}_{i}",
                "object": "event",
                "type": "checkout.session.completed",
                "created": created,
                "livemode": False,
                "data": {"object": {"id": session, "object": "checkout.session"}},
            }
        )
        for i, session in enumerate(sessions)
    ]


def _post_events(
    url: str, bodies: list[bytes], *, concurrency: int, seconds: float | None = None
) -> list[load.Call]:
    def request(i: int) -> tuple[bytes, dict[str, str]]:
        body = bodies[i]
        signature = stripe.WebhookSignature.generate_signature_header(body.decode(), WEBHOOK_SECRET)
        return body, {"Stripe-Signature": signature, "Content-Type": "application/json"}

    return load.run(
        load.drive(
            "POST",
            lambda _: url,
            concurrency=concurrency,
            count=len(bodies),
            seconds=seconds,
            request_of=request,
        )
    )


def _purchase_facts(db: Any) -> dict[str, dict[str, Any]]:
    """Per checkout session: state, creditId, when it was created and credited."""
    facts: dict[str, dict[str, Any]] = {}
    for session, pid, state, credit_id, created in db.query(
        "SELECT checkout_session_id, id, state, credit_id, created_at FROM purchases"
    ):
        facts[session] = {
            "id": pid,
            "state": state,
            "credit_id": credit_id,
            "created": to_unix(created),
            "credited": None,
        }
    by_id = {f["id"]: f for f in facts.values()}
    for pid, at in db.query(
        "SELECT subject_id, at FROM history WHERE subject = 'purchase' AND event = 'credited'"
    ):
        if pid in by_id:
            by_id[pid]["credited"] = to_unix(at)
    return facts


def _drain(db: Any, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        owed = db.query(
            "SELECT (SELECT count(*) FROM purchases WHERE state = 'authorized') "
            "+ (SELECT count(*) FROM stripe_events WHERE processed_at IS NULL)"
        )[0][0]
        if owed == 0:
            break
        time.sleep(0.2)
    return time.monotonic() - start


def _latencies(
    calls: list[load.Call],
    sessions: list[str],
    received: dict[str, float],
    facts: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    to_pulse, to_credited = [], []
    for i, call in enumerate(calls):
        fact = facts.get(sessions[i])
        if call.status != 200 or fact is None:
            continue
        if fact["credit_id"] in received:
            to_pulse.append(received[fact["credit_id"]] - call.start)
        if fact["credited"] is not None:
            to_credited.append(fact["credited"] - call.start)
    return {
        "webhook_to_200_ms": latency_ms(c.seconds for c in calls if c.status == 200),
        "webhook_to_coinpulse_ms": latency_ms(to_pulse),
        "webhook_to_credited_ms": latency_ms(to_credited),
    }


def run_database(
    kind: str, workers: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {"database": kind, "workers": workers}
    with (
        mosquitto(workdir, nodelay=True) as broker,
        database(kind, workdir) as db,
    ):
        standin = StandInProcess(workdir, None)
        server = ServerProcess(
            workdir,
            {
                "INSERTCOIN_DATABASE_URL": db.url,
                "INSERTCOIN_MQTT_URL": broker.url,
                "INSERTCOIN_MQTT_TOPIC_PREFIX": PREFIX,
                "INSERTCOIN_STRIPE_API_KEY": API_KEY,
                "INSERTCOIN_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "INSERTCOIN_STRIPE_API_BASE": standin.url,
                "INSERTCOIN_RECONCILE_INTERVAL_SECONDS": "3600",
            },
            workers,
            args.server_python,
        )
        print(f"\n== {runs.label(kind, workers)}: broker {broker.url}, stand-in {standin.url}")
        acker: AckerProcess | None = None
        try:
            result["server_start_seconds"] = round(server.start(), 3)
            register_cabinets(server)
            acker = AckerProcess(broker.url, PREFIX, workdir)
            warm_sessions = _prepare_sessions(standin, 100)
            serial_sessions = _prepare_sessions(standin, args.serial)
            load_sessions = _prepare_sessions(standin, int(args.seconds * PREPARED_RATE))
            url = f"{server.url}/webhooks/stripe"
            _post_events(url, _events(warm_sessions, "warm"), concurrency=4)
            _drain(db, 30)
            result["rss_mib_after_warm_up"] = _rss_mib(server.serving_pids())

            result["baseline_paho_ms"] = paho_round_trip(broker.url)
            result["baseline_http_ms"] = http_baselines(server)
            result["baseline_fsync_ms"] = fsync_baseline(workdir)

            serial = _post_events(url, _events(serial_sessions, "serial"), concurrency=1)
            _drain(db, 30)
            pids = {
                "server": server.all_pids(),
                "stand-in": [standin.process.pid],
                "mosquitto": [broker.process.pid] if broker.process else [],
                "acker": [acker.pid],
                "client": [os.getpid()],
            }
            cpu = CpuWindow(pids, db.server_backends if kind == "postgresql" else None)
            spent = cpu_seconds(pids)
            cpu.start()
            sustained = _post_events(
                url,
                _events(load_sessions, "load"),
                concurrency=args.concurrency,
                seconds=args.seconds,
            )
            usage = cpu.stop()
            drained = _drain(db, args.drain)
            # All the work of the sustained phase's purchases, the backlog's included.
            spent = {name: used - spent[name] for name, used in cpu_seconds(pids).items()}
            result["rss_mib_after_load"] = _rss_mib(server.serving_pids())
            print(f"  c={args.concurrency}: {len(sustained)} webhooks, drained in {drained:.1f} s")
        finally:
            records = acker.stop() if acker is not None else {"received": []}
            server.stop()
            standin.stop()
        result["server_log"] = server.log_summary()
        facts = _purchase_facts(db)

    received: dict[str, float] = {}
    for credit_id, at in records["received"]:
        received.setdefault(credit_id, at)
    result["serial"] = _latencies(serial, serial_sessions, received, facts)
    accepted = [c for c in sustained if c.status == 200]
    used = load_sessions[: len(sustained)]
    credited = [
        facts[s]["credited"]
        for s, c in zip(used, sustained, strict=True)
        if c.status == 200 and facts.get(s, {}).get("credited")
    ]
    start = min(c.start for c in sustained)
    result["sustained"] = {
        "accepted": load.rate(sustained),
        "credited": len(credited),
        "credited_per_second": round(len(credited) / (max(credited) - start), 1)
        if credited
        else None,
        "lost": len(accepted) - len(credited),
        "states": dict(
            sorted(
                {
                    state: sum(1 for s in used if facts.get(s, {}).get("state") == state)
                    for state in {f["state"] for f in facts.values()}
                }.items()
            )
        ),
        "drain_seconds": round(drained, 1),
        "cpu": usage,
        # From the first POST until nothing was owed, per purchase credited.
        "cpu_ms_per_credited": {
            name: round(seconds * 1000 / len(credited), 3) if credited else None
            for name, seconds in spent.items()
        },
        **_latencies(sustained, load_sessions, received, facts),
    }
    result["summary"] = _summary(result)
    return result


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    serial, sustained = r["serial"], r["sustained"]
    pulse = serial["webhook_to_coinpulse_ms"].get("p50")
    return {
        "webhook_to_coinpulse_p50_ms": pulse,
        "baseline_sum_p50_ms": round(
            r["baseline_paho_ms"]["p50"] + r["baseline_http_ms"]["/docs"]["p50"], 3
        ),
        "accepted_per_second": sustained["accepted"].get("per_second"),
        "credited_per_second": sustained["credited_per_second"],
        "lost": sustained["lost"],
        "rss_peak_mib": r["rss_mib_after_load"]["peak"],
        "server_cpu_ms_per_credited": sustained["cpu_ms_per_credited"]["server"],
        "targets": {
            "accepted_per_second": TARGET_ACCEPTED_PER_SECOND,
            "webhook_to_coinpulse_p50_ms": TARGET_PULSE_P50_MS,
            "credited_per_second": TARGET_CREDITED_PER_SECOND,
            "rss_mib": TARGET_RSS_MIB,
        },
        "accepted_vs_target": ratio(
            sustained["accepted"].get("per_second"), TARGET_ACCEPTED_PER_SECOND
        ),
        "credited_vs_target": ratio(sustained["credited_per_second"], TARGET_CREDITED_PER_SECOND),
    }


def _print_report(report: dict[str, Any]) -> None:
    rows = []
    for kind, run in report["runs"].items():
        s, serial = run["summary"], run["serial"]
        rows.append(
            [
                kind,
                fmt(serial["webhook_to_200_ms"].get("p50")),
                fmt(s["webhook_to_coinpulse_p50_ms"]),
                fmt(serial["webhook_to_coinpulse_ms"].get("p99")),
                fmt(serial["webhook_to_credited_ms"].get("p50")),
                fmt(s["baseline_sum_p50_ms"]),
                fmt(s["accepted_per_second"], 0),
                fmt(s["credited_per_second"], 0),
                s["lost"],
                fmt(s["server_cpu_ms_per_credited"]),
                fmt(s["rss_peak_mib"], 1),
            ]
        )
    print()
    print(
        table(
            [
                "run",
                "c=1 →200 p50",
                "→pulse p50",
                "→pulse p99",
                "→credited p50",
                "paho+/docs p50",
                "accepted/s c=32",
                "credited/s",
                "lost",
                "server CPU ms/credited",
                "RSS peak MiB",
            ],
            rows,
        )
    )
    ceiling = report["client_ceiling"].get("per_second")
    print(f"load generator ceiling (bare ASGI app, c=32): {fmt(ceiling, 0)}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runs.add_arguments(parser, out="bench/results/payments.json", drain=120.0, concurrency=CABINETS)
    parser.add_argument("--serial", type=int, default=300, help="webhooks at concurrency 1")
    args = parser.parse_args()
    plan = runs.planned(parser, args)
    report: dict[str, Any] = {
        "benchmark": "payments",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": os.getloadavg(),
        },
        "settings": {
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "server_python": args.server_python,
        },
        "runs": {},
    }
    started = time.monotonic()
    report["client_ceiling"] = client_ceiling(min(5.0, args.seconds), CABINETS)
    for kind, workers in plan:
        with tempfile.TemporaryDirectory(prefix=f"bench-payments-{kind}-") as tmp:
            report["runs"][runs.label(kind, workers)] = run_database(kind, workers, args, Path(tmp))
    report["machine"]["load_average_after"] = os.getloadavg()
    report["elapsed_seconds"] = round(time.monotonic() - started, 1)
    _print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['elapsed_seconds']} s)")


if __name__ == "__main__":
    main()
