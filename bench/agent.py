"""Agent benchmark: coinpulse → first pulse, the agent's RSS, and its start-up time.

    uv run python -m bench.agent [--grants 1000] [--rss-grants 10000]
                                 [--out bench/results/agent.json]

A private Mosquitto; the bench publishes the grants itself, as the server would (valid
`CoinPulse` JSON, unique creditIds, expiresAt in the future), so no server runs.

* Latency: the simulated output keeps its pulses in memory, so the agent
  (`insertcoin.agent.runner.Agent`, pulse mode) runs in this process with an output that
  stamps each pulse start; a separate paho client publishes one coinpulse at a time.
  Baseline: bare paho publish → receive through the same broker.
* RSS and start-up: `python -m insertcoin agent --config cabinet.toml` as a child.
  Start-up is spawn → the retained `status` with online:true seen by a subscriber
  (median of --starts); baseline `python -c "import paho.mqtt.client"`. RSS is read from
  /proc after start, after --rss-grants grants with at most IN_FLIGHT unacknowledged (the
  target), and after as many again published at once (reported, for the worst case).
  Bytecode is compiled first, as `pip install` leaves it on a cabinet.
"""

import argparse
import compileall
import datetime as dt
import importlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from tests.support.messages import coinpulse
from tests.support.services import free_port

from bench.broker import paho_round_trip
from bench.services import Mosquitto, mosquitto
from bench.stats import latency_ms, table
from insertcoin.agent.config import parse_config
from insertcoin.agent.outputs.simulated import SimulatedOutput
from insertcoin.agent.runner import Agent
from insertcoin.protocol import TopicKind, Topics

TARGET_P99_MS = 10.0
TARGET_RSS_MIB = 40e6 / 2**20  # the 40 MB, as /proc reports it
TARGET_START_SECONDS = 1.0
# Grants a cabinet sees at once: each is a purchase, and the server publishes them as they
# are paid. The flood (every grant published before the first is acked) is reported too.
IN_FLIGHT = 50
PREFIX = f"bench/agent-{uuid.uuid4().hex[:6]}"
TOPICS = Topics(PREFIX)


class StampedOutput(SimulatedOutput):
    """Records when each grant's first pulse starts (perf_counter), per creditId."""

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.pulsed = threading.Condition()

    def pulse(self, credit_id: str, count: int) -> None:
        now = time.perf_counter()
        with self.pulsed:
            self.started.setdefault(credit_id, now)
            self.pulsed.notify_all()
        super().pulse(credit_id, count)


def agent_config(machine_id: str, broker: Mosquitto, journal: Path) -> dict[str, Any]:
    return {
        "machine_id": machine_id,
        "mqtt": {"url": broker.url, "topic_prefix": PREFIX},
        "journal": {"path": str(journal)},
        "coin": {"mode": "pulse", "output": "simulated", "pulses_per_credit": 1},
        "gameover": {"source": "none"},
        "screen": {"listen": f"127.0.0.1:{free_port()}"},
    }


def _toml(config: dict[str, Any]) -> str:
    lines = []
    for section, values in config.items():
        if not isinstance(values, dict):
            lines.append(f"{section} = {json.dumps(values)}")
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


class Client:
    """A plain paho client; `on(topic, callback)` subscribes and waits for the SUBACK."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-{uuid.uuid4().hex[:6]}"
        )
        self.client.max_inflight_messages_set(0)
        self._handlers: dict[str, Callable[[paho.MQTTMessage], None]] = {}
        self.client.on_message = lambda _c, _u, m: self._handlers[m.topic](m)
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not connected.wait(10):
            raise TimeoutError(f"{name}: cannot connect")

    def on(self, topic: str, callback: Callable[[paho.MQTTMessage], None]) -> None:
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self._handlers[topic] = callback
        self.client.subscribe(topic, qos=1)
        if not subscribed.wait(10):
            raise TimeoutError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure_latency(broker: Mosquitto, workdir: Path, grants: int, warmup: int = 50) -> Any:
    """coinpulse publish() → the grant's first pulse starts, one grant at a time."""
    machine_id = "bench-latency"
    output = StampedOutput()
    agent = Agent(parse_config(agent_config(machine_id, broker, workdir / "latency.db")), output)
    agent.start()
    if not agent.wait_online(10):
        raise TimeoutError("the in-process agent did not connect")
    publisher = Client(broker, "pub")
    # The agent subscribes, then publishes its status, on one connection: once the status
    # is out, the broker has the subscription and the first grant cannot be dropped.
    announced = threading.Event()
    publisher.on(TOPICS.topic(machine_id, TopicKind.STATUS), lambda _m: announced.set())
    if not announced.wait(10):
        raise TimeoutError("the in-process agent published no status")
    topic = TOPICS.topic(machine_id, TopicKind.COINPULSE)
    samples: list[float] = []
    try:
        for i in range(warmup + grants):
            credit_id = f"cr_lat_{i:08d}"
            payload = coinpulse(machine_id, credit_id, expires_in=600)
            start = time.perf_counter()
            publisher.publish(topic, payload)
            with output.pulsed:
                if not output.pulsed.wait_for(lambda c=credit_id: c in output.started, 5):
                    raise TimeoutError(f"{credit_id}: no pulse within 5 s")
            if i >= warmup:
                samples.append(output.started[credit_id] - start)
    finally:
        publisher.close()
        agent.stop()
    return latency_ms(samples)


def rss_mib(pid: int) -> dict[str, float]:
    """Resident set now and at its peak (VmHWM), in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return {"now": fields["VmRSS"], "peak": fields["VmHWM"]}


class AgentProcess:
    """`python -m insertcoin agent --config <tmp>/cabinet.toml`; `started` is the spawn
    time and `online` is set when the subscriber sees the retained status online:true."""

    def __init__(self, broker: Mosquitto, workdir: Path, watcher: Client) -> None:
        workdir.mkdir(parents=True)
        self.machine_id = f"cab-{uuid.uuid4().hex[:8]}"
        config = workdir / "cabinet.toml"
        config.write_text(_toml(agent_config(self.machine_id, broker, workdir / "agent.db")))
        self.online = threading.Event()
        self.online_at = 0.0

        def on_status(message: paho.MQTTMessage) -> None:
            if orjson.loads(message.payload).get("online") and not self.online.is_set():
                self.online_at = time.perf_counter()
                self.online.set()

        watcher.on(TOPICS.topic(self.machine_id, TopicKind.STATUS), on_status)
        self.log = workdir / "agent.log"
        with self.log.open("wb") as sink:
            self.started = time.perf_counter()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "insertcoin", "agent", "--config", str(config)],
                cwd=workdir,
                stdout=sink,
                stderr=sink,
                env={**os.environ, "INSERTCOIN_LOG_LEVEL": "warning"},
            )

    def wait_online(self, timeout: float = 30) -> float:
        deadline = time.perf_counter() + timeout
        while not self.online.wait(0.05):
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited with {self.process.returncode}: {self.log}")
            if time.perf_counter() > deadline:
                raise TimeoutError("agent not online in time")
        return self.online_at - self.started

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)


def measure_child(broker: Mosquitto, workdir: Path, rss_grants: int, starts: int) -> Any:
    watcher = Client(broker, "watch")
    try:
        startup = []
        for n in range(starts):
            child = AgentProcess(broker, workdir / f"start-{n}", watcher)
            try:
                startup.append(child.wait_online())
            finally:
                child.stop()

        child = AgentProcess(broker, workdir / "rss", watcher)
        try:
            child.wait_online()
            time.sleep(0.5)  # let start-up work (first status, config) settle
            after_start = rss_mib(child.process.pid)
            acks = threading.Semaphore(0)
            watcher.on(TOPICS.topic(child.machine_id, TopicKind.ACK), lambda _m: acks.release())
            paced = send_grants(watcher, child.machine_id, "paced", rss_grants, IN_FLIGHT, acks)
            after_grants = rss_mib(child.process.pid)
            flood = send_grants(watcher, child.machine_id, "flood", rss_grants, rss_grants, acks)
            after_flood = rss_mib(child.process.pid)
        finally:
            child.stop()
    finally:
        watcher.close()
    return {
        "startup_seconds": [round(s, 4) for s in startup],
        "startup_median_seconds": round(statistics.median(startup), 4),
        "rss_after_start_mib": after_start,
        "rss_after_grants_mib": after_grants,
        "rss_after_flood_mib": after_flood,
        "rss_grants": rss_grants,
        "in_flight": IN_FLIGHT,
        "grants_per_second": round(rss_grants / paced, 1),
        "flood_grants_per_second": round(rss_grants / flood, 1),
    }


def send_grants(
    watcher: Client,
    machine_id: str,
    name: str,
    count: int,
    window: int,
    acks: threading.Semaphore,
) -> float:
    """Publish `count` grants with at most `window` unacknowledged; seconds until all acked."""
    topic = TOPICS.topic(machine_id, TopicKind.COINPULSE)
    began = time.perf_counter()
    for i in range(count):
        if i >= window and not acks.acquire(timeout=30):
            raise TimeoutError(f"{name}: no ack for 30 s after {i - window} grants")
        watcher.publish(topic, coinpulse(machine_id, f"cr_{name}_{i:08d}", expires_in=600))
    for _ in range(min(window, count)):
        if not acks.acquire(timeout=60):
            raise TimeoutError(f"{name}: grants left unacknowledged")
    return time.perf_counter() - began


def import_baseline(runs: int) -> dict[str, Any]:
    out = {}
    for code in ("pass", "import paho.mqtt.client"):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - start)
        out[f'python -c "{code}"'] = round(statistics.median(times), 4)
    return out


RSS_BASELINES = {
    "python -c pass": "pass",
    "import paho, msgspec, structlog, orjson": (
        "import paho.mqtt.client, msgspec, structlog, orjson"
    ),
    "import insertcoin.agent.runner": "import insertcoin.agent.runner",
}
READ_RSS = "\nprint(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"


def rss_baseline() -> dict[str, float]:
    """RSS of a Python that only imported what the agent stands on, in MiB."""
    out = {}
    for name, code in RSS_BASELINES.items():
        answer = subprocess.run(
            [sys.executable, "-c", code + READ_RSS], check=True, capture_output=True, text=True
        )
        out[name] = round(int(answer.stdout.split()[-1]) / 1024, 1)
    return out


def compile_bytecode() -> int:
    """Compile every module the agent command imports, as `pip install` does on a cabinet.

    A uv venv made without --compile-bytecode (or under PYTHONDONTWRITEBYTECODE) has no
    .pyc files, and compiling paho's 200 KB client at each start would cost the child
    8 MiB and 0.1 s that no installed agent pays."""
    importlib.import_module("insertcoin.cli")
    importlib.import_module("insertcoin.agent.cli")
    files = {getattr(module, "__file__", None) for module in list(sys.modules.values())}
    sources = sorted(f for f in files if f and f.endswith(".py"))
    for source in sources:
        compileall.compile_file(source, quiet=2)
    return len(sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grants", type=int, default=1000)
    parser.add_argument("--rss-grants", type=int, default=10_000)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/agent.json"))
    args = parser.parse_args()
    print(f"compiled bytecode of {compile_bytecode()} modules the agent imports", flush=True)
    # The in-process agent logs every grant at info; its lines are not what is measured.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        workdir = Path(tmp)
        with mosquitto(workdir) as broker:
            print(f"paho baseline through {broker.url} ...", flush=True)
            baseline = paho_round_trip(broker.url, count=args.grants)
            print(f"coinpulse → first pulse, {args.grants} grants ...", flush=True)
            latency = measure_latency(broker, workdir, args.grants)
            print(f"agent child: {args.starts} starts, {args.rss_grants} grants ...", flush=True)
            child = measure_child(broker, workdir, args.rss_grants, args.starts)
            imports = import_baseline(args.starts)
            rss_floor = rss_baseline()

    summary = {
        "pulse_p99_ms": latency["p99"],
        "pulse_p99_ok": latency["p99"] <= TARGET_P99_MS,
        "rss_after_grants_mib": child["rss_after_grants_mib"]["now"],
        "rss_ok": child["rss_after_grants_mib"]["peak"] <= TARGET_RSS_MIB,
        "startup_median_seconds": child["startup_median_seconds"],
        "startup_ok": child["startup_median_seconds"] <= TARGET_START_SECONDS,
    }
    rows = [
        ["coinpulse → first pulse (agent)", latency["p50"], latency["p99"], "p99 ≤ 10 ms"],
        ["paho publish → receive (baseline)", baseline["p50"], baseline["p99"], ""],
    ]
    print()
    print(table(["latency, ms", "p50", "p99", "target"], rows))
    print()
    rss_rows = [
        ["after start", child["rss_after_start_mib"]["now"], child["rss_after_start_mib"]["peak"]],
        [
            f"after {args.rss_grants} grants ({IN_FLIGHT} in flight)",
            child["rss_after_grants_mib"]["now"],
            child["rss_after_grants_mib"]["peak"],
        ],
        [
            f"after {args.rss_grants} more, all at once",
            child["rss_after_flood_mib"]["now"],
            child["rss_after_flood_mib"]["peak"],
        ],
    ]
    rss_rows += [[f"baseline: {name}", value, None] for name, value in rss_floor.items()]
    title = f"agent RSS, MiB (target ≤ 40 MB = {TARGET_RSS_MIB:.1f} MiB)"
    print(table([title, "now", "peak"], rss_rows))
    print(
        f"grants handled by the child: {child['grants_per_second']}/s paced, "
        f"{child['flood_grants_per_second']}/s flooded"
    )
    print()
    start_rows = [["agent spawn → retained status online", child["startup_median_seconds"]]]
    start_rows += [[name, value] for name, value in imports.items()]
    print(table(["start-up, median s (target ≤ 1)", "seconds"], start_rows))
    print()
    print("summary:", json.dumps(summary))

    result = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "latency_coinpulse_to_first_pulse_ms": latency,
        "baseline_paho_round_trip_ms": baseline,
        "child": child,
        "baseline_start_seconds": imports,
        "baseline_rss_mib": rss_floor,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
