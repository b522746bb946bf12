"""The agent's proofs (GUARANTEES scenario 6, network loss, cabinet isolation, bad input):
a real agent, a real Mosquitto and a real server; every grant ends `applied` exactly once
or `expired`, and no credit reaches the game twice.

The crash tests run `python -m insertcoin agent` as a child process whose coin output is
a command appending one line per pulse to a file, so every pulse that reached "the game"
is on disk outside the agent. INSERTCOIN_AGENT_CRASH_AT (a test hook in machine.py) makes
the agent SIGKILL itself at an exact point of a grant. Schedules come from a seed printed
with each test's summary line; INSERTCOIN_TEST_SEED replays one, and
INSERTCOIN_TEST_AGENT_KILLS sets the kills per crash point (50, as GUARANTEES.md says).
"""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import capture_logs

from insertcoin.agent.config import parse_config
from insertcoin.agent.outputs.simulated import SimulatedOutput
from insertcoin.agent.runner import Agent
from insertcoin.protocol import Ack, TopicKind, Topics, dump_message, utc_now
from insertcoin.server.brokerconfig import write_mosquitto_config
from insertcoin.server.cabinets.models import CabinetCreate
from insertcoin.server.cabinets.registry import CabinetRegistry
from insertcoin.server.store.database import open_database, upgrade
from tests.support.messages import coinpulse
from tests.support.server import ServerThread, add_cabinet, comp, grant_state, make_settings
from tests.support.services import Mosquitto, free_port, mosquitto

PULSES_PER_CREDIT = 2
KILLS = int(os.environ.get("INSERTCOIN_TEST_AGENT_KILLS", "50"))
FINAL = {"applied", "expired"}
IGNORED = ("coinpulse_invalid", "coinpulse_not_ours", "config_invalid", "config_not_ours")


# --- helpers -------------------------------------------------------------------------


def _seed() -> int:
    configured = os.environ.get("INSERTCOIN_TEST_SEED")
    return int(configured) if configured else random.SystemRandom().randrange(2**32)


def _say(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Write past pytest's capture, so passing runs show their numbers in CI logs too."""
    with capsys.disabled():
        print(f"\n[agent-faults] {line}", flush=True)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not in time: {what}")
        time.sleep(0.02)
    return value


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of this test's own that it may stop, kill and wipe."""
    (tmp_path / "mosquitto").mkdir()
    with mosquitto(tmp_path / "mosquitto") as running:
        yield running


@pytest.fixture
def topics() -> Topics:
    return Topics(f"test/{uuid.uuid4().hex[:8]}/machine")


@pytest.fixture
def server(broker: Mosquitto, topics: Topics, tmp_path: Path) -> Iterator[ServerThread]:
    settings = make_settings(f"sqlite:///{tmp_path / 'server.db'}", broker.url, topics.prefix)
    running = ServerThread(settings)
    try:
        yield running
    finally:
        running.stop()


class AgentProcess:
    """`python -m insertcoin agent --config cabinet.toml`, killable, always restarted with
    the same config: same client id, same persistent session, same journal."""

    def __init__(self, workdir: Path, machine_id: str, mqtt_url: str, prefix: str) -> None:
        self.workdir = workdir
        self.pulses = workdir / "pulses.txt"
        self.journal = workdir / "journal.db"
        self.port = free_port()
        self.config = workdir / "cabinet.toml"
        script = workdir / "coin.sh"
        pulse_line = '"$INSERTCOIN_CREDIT_ID" "$INSERTCOIN_PULSE_INDEX"'
        script.write_text(f'printf "%s %s\\n" {pulse_line} >> {self.pulses}\n')
        self.config.write_text(
            f'machine_id = "{machine_id}"\n'
            f'[mqtt]\nurl = "{mqtt_url}"\ntopic_prefix = "{prefix}"\n'
            f'[journal]\npath = "{self.journal}"\n'
            f'[coin]\nmode = "pulse"\noutput = "command"\ncommand = ["sh", "{script}"]\n'
            f"pulses_per_credit = {PULSES_PER_CREDIT}\ngap_ms = 1\n"
            f'[screen]\nlisten = "127.0.0.1:{self.port}"\n'
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, crash_at: str | None, *, wait: bool = False) -> None:
        env = {k: v for k, v in os.environ.items() if k != "INSERTCOIN_AGENT_CRASH_AT"}
        if crash_at:
            env["INSERTCOIN_AGENT_CRASH_AT"] = crash_at
        with (self.workdir / "agent.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "insertcoin", "agent", "--config", str(self.config)],
                env=env,
                stdout=log,
                stderr=log,
            )
        self.starts += 1
        if wait:
            wait_until(self._online, 20, "agent online")

    def _online(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, (self.workdir / "agent.log").read_text()[-3000:]
        try:
            return bool(
                httpx.get(f"http://127.0.0.1:{self.port}/state", timeout=1).json()["online"]
            )
        except httpx.HTTPError:
            return False

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def lines(self) -> Counter[str]:
        if not self.pulses.exists():
            return Counter()
        return Counter(line.split()[0] for line in self.pulses.read_text().splitlines())

    def journal_rows(self) -> tuple[dict[str, tuple[str, int]], int]:
        with sqlite3.connect(self.journal) as db:
            grants = {
                r[0]: (r[1], r[2])
                for r in db.execute("SELECT credit_id, result, credits FROM grants")
            }
            (held,) = db.execute("SELECT credits FROM counter").fetchone()
        return grants, int(held)


def _in_process_agent(
    machine_id: str, mqtt_url: str, prefix: str, tmp_path: Path
) -> tuple[Agent, SimulatedOutput]:
    config = parse_config(
        {
            "machine_id": machine_id,
            "mqtt": {"url": mqtt_url, "topic_prefix": prefix},
            "journal": {"path": str(tmp_path / f"{machine_id}.db")},
            "coin": {"output": "simulated", "pulses_per_credit": PULSES_PER_CREDIT},
            "screen": {"listen": f"127.0.0.1:{free_port()}"},
        }
    )
    output = SimulatedOutput()
    agent = Agent(config, output=output)
    agent.start()
    return agent, output


def _assert_exactly_once(
    server: ServerThread, agent: AgentProcess, issued: dict[str, int], seed: int
) -> Counter[str]:
    """Every grant final on the server; the pulse file and the journal agree with it."""
    states = Counter(dict.fromkeys(FINAL, 0))
    applied = 0
    for credit_id, credits in issued.items():
        state = grant_state(server, credit_id)
        assert state in FINAL, f"seed {seed}: {credit_id} ended {state}"
        states[state] += 1
        if state == "applied":
            applied += credits
    lines = agent.lines()
    # Credits journaled but not yet pulsed when the agent died go out on restart under
    # the creditId "resume": so per grant, all of its pulses or none, and the total exact.
    for credit_id, credits in issued.items():
        assert lines[credit_id] in (0, credits * PULSES_PER_CREDIT), f"seed {seed}: {credit_id}"
    assert sum(lines.values()) == applied * PULSES_PER_CREDIT, f"seed {seed}: {lines}"
    journal, held = agent.journal_rows()
    assert held == 0, f"seed {seed}: {held} credits left in the journal"
    for credit_id, credits in issued.items():
        if grant_state(server, credit_id) == "applied":
            assert journal.get(credit_id) == ("applied", credits), f"seed {seed}: {credit_id}"
    return states


def _cabinet(server: ServerThread, broker: Mosquitto, machine_id: str) -> str:
    password = add_cabinet(server.admin, machine_id)["mqtt"]["password"]
    return f"mqtt://{machine_id}:{password}@127.0.0.1:{broker.port}"


# --- scenario 6: the agent killed at exact points of a grant ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize("point", ["received", "journaled", "pulsed"])
def test_agent_killed_mid_grant_never_pulses_twice(
    point: str,
    server: ServerThread,
    broker: Mosquitto,
    topics: Topics,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILLed between receiving a grant and journaling it (`received`), between
    journaling and pulsing (`journaled`), or between pulsing and acking (`pulsed`), KILLS
    times, restarted each time with the same session and journal: every grant ends
    `applied` exactly once (or `expired`), each credit reaches the game exactly once, and
    the journal holds each creditId once with nothing left over."""
    seed = _seed()
    rng = random.Random(seed)
    machine_id = f"cab-{uuid.uuid4().hex[:8]}"
    agent = AgentProcess(tmp_path, machine_id, _cabinet(server, broker, machine_id), topics.prefix)
    # After `journaled` and `pulsed` a re-delivery is a duplicate, which never crashes, so
    # the restarted agent may carry the hook; after `received` it would crash again.
    chained = point != "received"
    started = time.monotonic()
    issued: dict[str, int] = {}
    crashes = 0
    try:
        agent.start(point if chained else None, wait=True)
        for _ in range(KILLS):
            if not chained:
                agent.kill()
                agent.start(point)
            credits = rng.randint(1, 3)
            credit_id = comp(server, machine_id, credits)
            issued[credit_id] = credits
            wait_until(lambda: agent.exited() is not None, what=f"crash at {point}")
            assert agent.exited() == -signal.SIGKILL
            crashes += 1
            time.sleep(rng.uniform(0, 0.3))  # let the server's re-sends pile up, or not
            agent.start(point if chained else None)
            wait_until(lambda: grant_state(server, credit_id) in FINAL, what=credit_id)  # noqa: B023
        states = _assert_exactly_once(server, agent, issued, seed)
    finally:
        agent.kill()
    _say(
        capsys,
        f"agent-kill point={point} seed={seed} kills={crashes} starts={agent.starts} "
        f"grants={len(issued)} applied={states['applied']} expired={states['expired']} "
        f"pulses={sum(agent.lines().values())} seconds={time.monotonic() - started:.1f}",
    )
    assert crashes == KILLS


# --- network loss ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["restart", "wipe"])
def test_grants_in_flight_survive_broker_loss(
    fault: str,
    server: ServerThread,
    broker: Mosquitto,
    topics: Topics,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Grants issued while Mosquitto is restarted keeping its persistence (`restart`), or
    killed and restarted empty so the agent's session and every queued message are gone
    and its connection is cut (`wipe`): each grant ends `applied` exactly once or
    `expired`, and the game gets each applied credit's pulses exactly once."""
    seed = _seed()
    rng = random.Random(seed)
    machine_id = f"cab-{uuid.uuid4().hex[:8]}"
    agent, output = _in_process_agent(
        machine_id, _cabinet(server, broker, machine_id), topics.prefix, tmp_path
    )
    started = time.monotonic()
    issued: dict[str, int] = {}
    faults = 0
    try:
        assert agent.wait_online(10)
        for _ in range(6):
            # Some grants just sent (in flight at the broker or the agent) when it goes...
            for _ in range(rng.randint(3, 6)):
                credits = rng.randint(1, 3)
                issued[comp(server, machine_id, credits)] = credits
            if fault == "restart":
                broker.stop()
            else:
                broker.kill(wipe=True)
            # ...and some issued while it is away, piling up at the server.
            for _ in range(rng.randint(1, 4)):
                credits = rng.randint(1, 3)
                issued[comp(server, machine_id, credits)] = credits
            time.sleep(rng.uniform(0, 0.5))
            broker.start()
            faults += 1
            time.sleep(rng.uniform(0, 1.5))
        for credit_id in issued:
            wait_until(lambda: grant_state(server, credit_id) in FINAL, 60, credit_id)  # noqa: B023
        states: Counter[str] = Counter()
        for credit_id, credits in issued.items():
            state = grant_state(server, credit_id)
            states[state] += 1
            want = credits * PULSES_PER_CREDIT if state == "applied" else 0
            assert output.pulses[credit_id] == want, f"seed {seed}: {credit_id} {state}"
        assert output.total == sum(output.pulses[c] for c in issued), f"seed {seed}"
        assert agent.snapshot()["credits"] == 0
    finally:
        agent.stop()
    _say(
        capsys,
        f"broker-{fault} seed={seed} faults={faults} grants={len(issued)} "
        f"applied={states['applied']} expired={states['expired']} pulses={output.total} "
        f"seconds={time.monotonic() - started:.1f}",
    )


# --- cabinet isolation -----------------------------------------------------------------


def test_cabinet_credentials_cannot_take_another_cabinets_grants(
    topics: Topics, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On Mosquitto configured by `insertcoin broker mosquitto-config`, an agent logging
    in with cabinet A's credentials but `machine_id = B` receives none of B's grants and
    cannot speak for B: B's grant is never pulsed and expires, a forged `applied` ack for
    it changes nothing, and the server never sees B online; A's own agent still works."""
    port = free_port()
    server_url = f"mqtt://insertcoin:server-secret-0123@127.0.0.1:{port}"
    settings = make_settings(
        f"sqlite:///{tmp_path / 'server.db'}", server_url, topics.prefix, credit_ttl_seconds=2.0
    )
    db = open_database(settings.sqlalchemy_url)
    upgrade(db)
    passwords: dict[str, str] = {}
    for machine_id in ("cabA", "cabB"):
        created = CabinetRegistry(db, settings).create(
            CabinetCreate(
                machine_id=machine_id,
                name=f"Cabinet {machine_id}",
                price={"amount": 100, "currency": "usd"},
            )
        )
        passwords[machine_id] = created.mqtt.password
    config_dir = tmp_path / "mosquitto-config"
    write_mosquitto_config(settings, db, config_dir)
    db.dispose()
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(
        tmp_path / "broker", f"allow_anonymous true\ninclude_dir {config_dir.resolve()}\n", port
    )
    broker.start()
    server = ServerThread(settings)
    as_a = f"mqtt://cabA:{passwords['cabA']}@127.0.0.1:{port}"
    honest, honest_output = _in_process_agent("cabA", as_a, topics.prefix, tmp_path)
    impostor, impostor_output = _in_process_agent("cabB", as_a, topics.prefix, tmp_path / "b")
    try:
        assert honest.wait_online(10)
        assert impostor.wait_online(10)
        own = comp(server, "cabA", 1)
        foreign = comp(server, "cabB", 2)
        wait_until(lambda: grant_state(server, own) == "applied", what="A's own grant")
        forged = Ack(
            machine_id="cabB", credit_id=foreign, result="applied", reason=None, timestamp=utc_now()
        )
        impostor.session.publish(TopicKind.ACK, dump_message(forged))
        wait_until(lambda: grant_state(server, foreign) == "expired", what="B's grant expires")
        assert impostor_output.total == 0
        assert honest_output.pulses == {own: PULSES_PER_CREDIT}
        assert server.admin.get("/api/cabinets/cabB").json()["online"] is False
        assert server.admin.get("/api/cabinets/cabA").json()["online"] is True
    finally:
        impostor.stop()
        honest.stop()
        server.stop()
        broker.stop()


# --- bad input -------------------------------------------------------------------------


def test_bad_input_is_ignored_and_logged(
    server: ServerThread,
    broker: Mosquitto,
    topics: Topics,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Malformed JSON, wrong types, missing keys, oversized payloads, another machineId
    and another machine's CabinetConfig on `coinpulse` and `config`: each is ignored and
    logged, nothing is pulsed or acked for it, the cabinet's config stays its own, and the
    agent still applies the next real grant exactly once."""
    machine_id = f"cab-{uuid.uuid4().hex[:8]}"
    with capture_logs() as logs:
        agent, output = _in_process_agent(
            machine_id, _cabinet(server, broker, machine_id), topics.prefix, tmp_path
        )
        try:
            assert agent.wait_online(10)
            wait_until(lambda: agent.cabinet is not None, what="the server's config")
            assert agent.cabinet is not None
            ours = agent.cabinet
            good = orjson.loads(coinpulse(machine_id, "cr_bad_input_probe"))
            config = orjson.loads(dump_message(ours))
            common = [
                b"{not json",
                b"\xff\xfe\x00",
                b"",
                b"[]",
                b"null",
                b'"a string"',
                b"{}",
                b"x" * 20_000,
                orjson.dumps({"padding": "x" * 20_000}),
            ]
            coinpulses = [
                *common,
                orjson.dumps({k: v for k, v in good.items() if k != "creditId"}),
                orjson.dumps({**good, "credits": "1"}),
                orjson.dumps({**good, "credits": 0}),
                orjson.dumps({**good, "credits": 10**9}),
                orjson.dumps({**good, "creditId": 123}),
                orjson.dumps({**good, "expiresAt": "tomorrow"}),
                orjson.dumps({**good, "machineId": "someone-else", "creditId": "cr_foreign"}),
            ]
            configs = [
                *common,
                orjson.dumps({k: v for k, v in config.items() if k != "payUrl"}),
                orjson.dumps({**config, "price": {"amount": "1", "currency": "usd"}}),
                orjson.dumps({**config, "creditsPerPurchase": -1}),
                orjson.dumps({**config, "machineId": "someone-else", "name": "Not ours"}),
            ]
            sender = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=f"bad-{uuid.uuid4().hex[:8]}"
            )
            sender.connect("127.0.0.1", broker.port)
            sender.loop_start()
            try:
                for payload in coinpulses:
                    topic = topics.topic(machine_id, TopicKind.COINPULSE)
                    sender.publish(topic, payload, qos=1).wait_for_publish(5)
                for payload in configs:
                    topic = topics.topic(machine_id, TopicKind.CONFIG)
                    sender.publish(topic, payload, qos=1).wait_for_publish(5)
            finally:
                sender.disconnect()
                sender.loop_stop()

            def events(*names: str) -> int:
                return sum(1 for entry in logs if entry["event"] in names)

            wait_until(
                lambda: (
                    events("coinpulse_invalid", "coinpulse_not_ours") == len(coinpulses)
                    and events("config_invalid", "config_not_ours") == len(configs)
                ),
                what="every bad message logged",
            )
            credit_id = comp(server, machine_id, 2)
            wait_until(lambda: grant_state(server, credit_id) == "applied", what="next grant")
            assert output.pulses == {credit_id: 2 * PULSES_PER_CREDIT}
            assert agent.cabinet == ours
            assert agent.snapshot()["credits"] == 0
        finally:
            agent.stop()
    _say(
        capsys,
        f"bad-input coinpulse={len(coinpulses)} config={len(configs)} "
        f"ignored={events(*IGNORED)} "
        f"pulses={output.total}",
    )
