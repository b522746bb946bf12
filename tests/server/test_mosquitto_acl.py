"""Cabinet isolation on a real Mosquitto (GUARANTEES.md G6, scenario 9).

The broker runs on exactly the files `insertcoin broker mosquitto-config` writes, loaded
the way docs/mosquitto.md tells operators to (`include_dir`). Cabinets are registered
through the registry, so their passwords are the ones `cabinet add` prints and the
password file holds only the hashes the database stored.

"Never arrives" is proven with a fence, not a sleep: Mosquitto handles one client's
packets in order and queues deliveries to each subscriber in order, so once a marker
sent after the forbidden messages has arrived, anything they would have caused has too.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from insertcoin.protocol import TopicKind
from insertcoin.protocol.topics import CABINET_PUBLISHES, SERVER_PUBLISHES
from insertcoin.server.brokerconfig import MosquittoFiles, write_mosquitto_config
from insertcoin.server.cabinets.models import CabinetCreate
from insertcoin.server.cabinets.registry import CabinetRegistry
from insertcoin.server.errors import ConfigError
from insertcoin.server.settings import Settings
from insertcoin.server.store.database import Database, open_database, upgrade
from tests.support.server import make_settings
from tests.support.services import Mosquitto, mosquitto

SERVER_USER, SERVER_PASSWORD = "insertcoin", "server-secret-0123"
# The files depend on the server's user and password only, not on where the broker is.
SERVER_URL = f"mqtt://{SERVER_USER}:{SERVER_PASSWORD}@127.0.0.1:1883"
NO_SERVER_USER = (
    "error: INSERTCOIN_MQTT_URL needs a user for the server account, "
    "e.g. mqtt://insertcoin:SECRET@host:1883"
)
WAIT = 5.0
CABINET_KINDS = sorted(CABINET_PUBLISHES)
SERVER_KINDS = sorted(SERVER_PUBLISHES)
NOT_AUTHORIZED = 135  # MQTT 5's PUBACK reason; MQTT 3.1.1 cannot say it, the message just goes

PROTOCOLS = pytest.mark.parametrize(
    "protocol", [paho.MQTTv311, paho.MQTTv5], ids=["mqtt311", "mqtt5"]
)
# Once the files are written the database plays no part, so SQLite is enough there.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _eventually(predicate: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Client:
    """A real MQTT client that records everything it receives, so a test can also prove
    what did not arrive."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        *,
        protocol: int = paho.MQTTv311,
        client_id: str | None = None,
        persistent: bool = False,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.port = port
        self.protocol = protocol
        self.persistent = persistent
        self.received: list[tuple[str, bytes]] = []
        self.connack: ReasonCode | None = None
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._changed = threading.Condition()
        self._dead = False
        self.mqtt = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{uuid.uuid4().hex[:12]}",
            protocol=protocol,
            # MQTT 5 asks for a clean start in connect() instead.
            clean_session=None if protocol == paho.MQTTv5 else not persistent,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.mqtt.username_pw_set(username, password)
        if will is not None:
            self.mqtt.will_set(will[0], will[1], qos=1, retain=True)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_message = self._on_message
        self.mqtt.on_publish = self._on_publish
        self.mqtt.on_subscribe = self._on_subscribe

    def connect(self) -> ReasonCode:
        """Connect and return the broker's answer."""
        if self.protocol == paho.MQTTv5:
            self.mqtt.connect("127.0.0.1", self.port, clean_start=not self.persistent)
        else:
            self.mqtt.connect("127.0.0.1", self.port)
        self.mqtt.loop_start()
        assert self._wait(lambda: self.connack is not None), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def start(self) -> "Client":
        reason = self.connect()
        assert not reason.is_failure, f"connection refused: {reason}"
        return self

    def subscribe(self, *filters: str) -> None:
        _, mid = self.mqtt.subscribe([(topic_filter, 1) for topic_filter in filters])
        assert self._wait(lambda: mid in self._subacks), f"no SUBACK for {filters}"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the reason code of the PUBACK."""
        mid = self.mqtt.publish(topic, payload, qos=1, retain=retain).mid
        assert self._wait(lambda: mid in self._pubacks), f"no PUBACK for {topic}"
        return self._pubacks[mid]

    def wait_for(self, topic: str, payload: bytes) -> bool:
        return self._wait(lambda: (topic, payload) in self.received)

    def die(self) -> None:
        """Drop the connection without DISCONNECT, as a cabinet losing power does."""
        sock = self.mqtt.socket()
        assert isinstance(sock, socket.socket)
        # Shut down first: the network thread then sees the end at once and stops.
        sock.shutdown(socket.SHUT_RDWR)
        self.mqtt.loop_stop()
        sock.close()
        self._dead = True

    def stop(self) -> None:
        if not self._dead:
            self.mqtt.disconnect()
            self.mqtt.loop_stop()

    def _wait(self, predicate: Callable[[], bool]) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, WAIT)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            self.connack = reason
            self._changed.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._changed:
            self.received.append((message.topic, bytes(message.payload)))
            self._changed.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            self._pubacks[mid] = reason
            self._changed.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._changed:
            self._subacks[mid] = reasons
            self._changed.notify_all()


@dataclass
class Store:
    """Cabinets registered in a real database, and the broker files written from it."""

    settings: Settings
    db: Database
    config_dir: Path
    passwords: dict[str, str] = field(default_factory=dict)

    def add_cabinet(self, machine_id: str) -> None:
        created = CabinetRegistry(self.db, self.settings).create(
            CabinetCreate(
                machine_id=machine_id,
                name=f"Cabinet {machine_id}",
                price={"amount": 100, "currency": "usd"},
            )
        )
        self.passwords[machine_id] = created.mqtt.password

    def write_config(self) -> MosquittoFiles:
        return write_mosquitto_config(self.settings, self.db, self.config_dir)


@dataclass
class Fleet:
    """A Mosquitto running on the files of `store`, and clients of it."""

    store: Store
    broker: Mosquitto
    clients: list[Client] = field(default_factory=list)

    def topic(self, machine_id: str, kind: TopicKind) -> str:
        return self.store.settings.topics().topic(machine_id, kind)

    def wildcard(self, kind: TopicKind) -> str:
        return self.store.settings.topics().wildcard(kind)

    def client(self, username: str | None, password: str | None, **options: Any) -> Client:
        client = Client(self.broker.port, username, password, **options)
        self.clients.append(client)
        return client

    def cabinet(self, machine_id: str, **options: Any) -> Client:
        return self.client(machine_id, self.store.passwords[machine_id], **options)

    def server(self, **options: Any) -> Client:
        return self.client(SERVER_USER, SERVER_PASSWORD, **options)


def operator_lines(config_dir: Path) -> str:
    """A stock mosquitto.conf that lets anyone in, plus the line the command tells the
    operator to add (the broker runs as this user: see tests.support.services)."""
    return f"allow_anonymous true\ninclude_dir {config_dir}\n"


@pytest.fixture
def store(db_url: str, prefix: str, tmp_path: Path) -> Iterator[Store]:
    settings = make_settings(db_url, SERVER_URL, prefix)
    db = open_database(settings.sqlalchemy_url)
    upgrade(db)
    registered = Store(settings, db, tmp_path / "mosquitto-config")
    registered.add_cabinet("cabA")
    registered.add_cabinet("cabB")
    registered.write_config()
    try:
        yield registered
    finally:
        db.dispose()


@pytest.fixture
def fleet(store: Store, tmp_path: Path) -> Iterator[Fleet]:
    (tmp_path / "broker").mkdir()
    with mosquitto(tmp_path / "broker", operator_lines(store.config_dir)) as broker:
        running = Fleet(store, broker)
        try:
            yield running
        finally:
            for client in running.clients:
                client.stop()


def marker() -> bytes:
    return f"fence-{uuid.uuid4().hex[:8]}".encode()


@PROTOCOLS
def test_cabinet_talks_on_its_own_topics(fleet: Fleet, protocol: int) -> None:
    """A cabinet logs in with the password `cabinet add` printed (its hash came from the
    database), publishes its own ack/status/gameover to the server, and receives its own
    coinpulse and retained config from the server."""
    server = fleet.server(protocol=protocol).start()
    server.subscribe(*(fleet.wildcard(kind) for kind in CABINET_KINDS))
    cab_a = fleet.cabinet("cabA", protocol=protocol).start()
    cab_a.subscribe(fleet.topic("cabA", TopicKind.COINPULSE), fleet.topic("cabA", TopicKind.CONFIG))

    for kind in CABINET_KINDS:
        topic = fleet.topic("cabA", kind)
        assert not cab_a.publish(topic, b"from A", retain=kind is TopicKind.STATUS).is_failure
        assert server.wait_for(topic, b"from A"), f"the server did not get A's {kind}"
    for kind in SERVER_KINDS:
        topic = fleet.topic("cabA", kind)
        assert not server.publish(topic, b"for A", retain=kind is TopicKind.CONFIG).is_failure
        assert cab_a.wait_for(topic, b"for A"), f"A did not get its {kind}"


@SQLITE_ONLY
@PROTOCOLS
def test_cabinet_receives_nothing_of_another_cabinet(fleet: Fleet, protocol: int) -> None:
    """Cabinet A subscribing to B's coinpulse and config, to `{prefix}/+/coinpulse`,
    `{prefix}/#`, `#` and a shared subscription receives B's messages neither live nor
    retained, while B does get them; nothing but its own config and coinpulse reaches A,
    not even its own ack. (Mosquitto 2.0 grants every SUBSCRIBE and drops, message by
    message, what A may not read.)"""
    server = fleet.server(protocol=protocol).start()
    config_a, config_b = (
        fleet.topic("cabA", TopicKind.CONFIG),
        fleet.topic("cabB", TopicKind.CONFIG),
    )
    pulse_a, pulse_b = (
        fleet.topic("cabA", TopicKind.COINPULSE),
        fleet.topic("cabB", TopicKind.COINPULSE),
    )
    server.publish(config_a, b"config A", retain=True)
    server.publish(config_b, b"config B", retain=True)
    cab_b = fleet.cabinet("cabB", protocol=protocol).start()
    cab_b.subscribe(pulse_b, config_b)
    cab_a = fleet.cabinet("cabA", protocol=protocol).start()
    prefix = fleet.store.settings.topics().prefix
    cab_a.subscribe(
        pulse_b,
        config_b,
        fleet.wildcard(TopicKind.COINPULSE),
        fleet.wildcard(TopicKind.CONFIG),
        f"{prefix}/#",
        "#",
        f"$share/thief/{fleet.wildcard(TopicKind.COINPULSE)}",
    )

    server.publish(pulse_b, b"pulse B")
    assert cab_b.wait_for(config_b, b"config B")
    assert cab_b.wait_for(pulse_b, b"pulse B")
    cab_a.publish(fleet.topic("cabA", TopicKind.ACK), b"A's own ack")  # write-only for A
    fence = marker()
    server.publish(pulse_a, fence)
    assert cab_a.wait_for(pulse_a, fence)

    assert set(cab_a.received) == {(config_a, b"config A"), (pulse_a, fence)}


@SQLITE_ONLY
@PROTOCOLS
def test_cabinet_cannot_publish_for_another_cabinet_or_as_the_server(
    fleet: Fleet, protocol: int
) -> None:
    """Cabinet A publishing B's ack, gameover and (retained) status, anyone's coinpulse or
    (retained) config, has 0 effects: the server and B receive none of it, B's retained
    status and config stay the genuine ones, and MQTT 5 tells A "not authorized"."""
    server = fleet.server(protocol=protocol).start()
    server.subscribe(f"{fleet.store.settings.topics().prefix}/#")
    cab_b = fleet.cabinet("cabB", protocol=protocol).start()
    cab_b.subscribe(fleet.topic("cabB", TopicKind.COINPULSE), fleet.topic("cabB", TopicKind.CONFIG))
    status_b, config_b = (
        fleet.topic("cabB", TopicKind.STATUS),
        fleet.topic("cabB", TopicKind.CONFIG),
    )
    cab_b.publish(status_b, b"genuine status B", retain=True)
    server.publish(config_b, b"genuine config B", retain=True)
    assert server.wait_for(status_b, b"genuine status B")
    assert cab_b.wait_for(config_b, b"genuine config B")
    cab_a = fleet.cabinet("cabA", protocol=protocol).start()
    cab_a.subscribe(fleet.topic("cabA", TopicKind.COINPULSE), fleet.topic("cabA", TopicKind.CONFIG))

    forged = [fleet.topic("cabB", kind) for kind in TopicKind]
    forged += [fleet.topic("cabA", kind) for kind in SERVER_KINDS]
    for topic in forged:
        reason = cab_a.publish(topic, b"forged", retain=topic.endswith(("/status", "/config")))
        if protocol == paho.MQTTv5:
            assert reason.value == NOT_AUTHORIZED, f"{topic}: {reason}"

    # A's packets are handled in order, so its fence arriving means the forgeries were
    # handled; the server's fences then flush whatever was queued for A and B.
    fence = marker()
    cab_a.publish(fleet.topic("cabA", TopicKind.ACK), fence)
    assert server.wait_for(fleet.topic("cabA", TopicKind.ACK), fence)
    for machine_id, cabinet in (("cabA", cab_a), ("cabB", cab_b)):
        server.publish(fleet.topic(machine_id, TopicKind.COINPULSE), fence)
        assert cabinet.wait_for(fleet.topic(machine_id, TopicKind.COINPULSE), fence)
    assert all(
        payload != b"forged" for _, payload in server.received + cab_b.received + cab_a.received
    )

    late_server = fleet.server(protocol=protocol).start()
    late_server.subscribe(status_b)
    late_b = fleet.cabinet("cabB", protocol=protocol).start()
    late_b.subscribe(config_b)
    assert late_server.wait_for(status_b, b"genuine status B")
    assert late_b.wait_for(config_b, b"genuine config B")
    assert late_server.received == [(status_b, b"genuine status B")]
    assert late_b.received == [(config_b, b"genuine config B")]


@SQLITE_ONLY
@PROTOCOLS
def test_last_will_only_on_own_status(fleet: Fleet, protocol: int) -> None:
    """A cabinet's Last Will reaches the server on its own status topic; a Will that A
    sets on B's status is dropped when A dies (Mosquitto 2.0 accepts the connection and
    checks the Will when it would publish it), and B's retained status stays genuine."""
    server = fleet.server(protocol=protocol).start()
    server.subscribe(fleet.wildcard(TopicKind.STATUS))
    status_a, status_b = (
        fleet.topic("cabA", TopicKind.STATUS),
        fleet.topic("cabB", TopicKind.STATUS),
    )
    cab_b = fleet.cabinet("cabB", protocol=protocol).start()
    cab_b.publish(status_b, b"genuine status B", retain=True)
    assert server.wait_for(status_b, b"genuine status B")

    # The same client id twice: the broker is done with the first connection, its Will
    # included, before it accepts the second.
    client_id = f"agent-{uuid.uuid4().hex[:8]}"
    fleet.cabinet(
        "cabA", protocol=protocol, client_id=client_id, will=(status_b, b"forged")
    ).start().die()
    fence = marker()
    fleet.cabinet(
        "cabA", protocol=protocol, client_id=client_id, will=(status_a, fence)
    ).start().die()
    assert server.wait_for(status_a, fence)

    assert server.received == [(status_b, b"genuine status B"), (status_a, fence)]
    late_server = fleet.server(protocol=protocol).start()
    late_server.subscribe(status_b)
    assert late_server.wait_for(status_b, b"genuine status B")


@SQLITE_ONLY
@PROTOCOLS
def test_wrong_credentials_are_refused(fleet: Fleet, protocol: int) -> None:
    """Connections with a wrong password, another cabinet's password, an unknown user, a
    cabinet's password for the server account, or no credentials at all are refused."""
    attempts = {
        "wrong password": ("cabA", "not-the-password"),
        "B's password": ("cabA", fleet.store.passwords["cabB"]),
        "unknown user": ("cabZ", fleet.store.passwords["cabA"]),
        "server account": (SERVER_USER, fleet.store.passwords["cabA"]),
        "anonymous": (None, None),
    }
    for what, (username, password) in attempts.items():
        reason = fleet.client(username, password, protocol=protocol).connect()
        assert reason.is_failure, f"{what}: accepted"


@SQLITE_ONLY
def test_server_reaches_every_cabinet_and_shares_their_acks(fleet: Fleet) -> None:
    """The server account publishes coinpulse to every cabinet, and two server instances
    on `$share/insertcoin/{prefix}/+/ack` get each cabinet's ack exactly once between
    them, although the ACL names only `{prefix}/+/ack`."""
    settings = fleet.store.settings
    shared = settings.topics().shared(TopicKind.ACK, settings.share_group())
    servers = [fleet.server().start(), fleet.server(protocol=paho.MQTTv5).start()]
    for server in servers:
        server.subscribe(shared)
    cabinets = {m: fleet.cabinet(m).start() for m in ("cabA", "cabB")}
    for machine_id, cabinet in cabinets.items():
        cabinet.subscribe(fleet.topic(machine_id, TopicKind.COINPULSE))
        servers[0].publish(fleet.topic(machine_id, TopicKind.COINPULSE), b"pulse")
        assert cabinet.wait_for(fleet.topic(machine_id, TopicKind.COINPULSE), b"pulse")

    sent = []
    for machine_id, cabinet in cabinets.items():
        for n in range(3):
            sent.append((fleet.topic(machine_id, TopicKind.ACK), f"ack {n}".encode()))
            cabinet.publish(*sent[-1])
    assert _eventually(lambda: sum(len(s.received) for s in servers) >= len(sent))
    assert sorted(servers[0].received + servers[1].received) == sorted(sent)


@SQLITE_ONLY
@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared"])
def test_cabinet_in_the_servers_share_group_takes_no_acks(fleet: Fleet, shared: bool) -> None:
    """Cabinet A subscribing to `$share/insertcoin/{prefix}/+/ack` costs the server none of
    B's acks: brokers let anyone join any share group, so the server's group is named
    after its own secret (`Settings.share_group`), which a cabinet cannot guess."""
    settings = fleet.store.settings
    topics = settings.topics()
    assert settings.share_group() != "insertcoin"
    server = fleet.server().start()
    server.subscribe(
        topics.shared(TopicKind.ACK, settings.share_group())
        if shared
        else topics.wildcard(TopicKind.ACK),
        topics.wildcard(TopicKind.STATUS),
    )
    fleet.cabinet("cabA").start().subscribe(topics.shared(TopicKind.ACK, "insertcoin"))
    cab_b = fleet.cabinet("cabB").start()

    acks = [(topics.topic("cabB", TopicKind.ACK), f"ack {n}".encode()) for n in range(4)]
    for ack in acks:
        cab_b.publish(*ack)
    fence = marker()
    cab_b.publish(topics.topic("cabB", TopicKind.STATUS), fence)
    assert server.wait_for(topics.topic("cabB", TopicKind.STATUS), fence)

    assert [m for m in server.received if m in acks] == acks


@SQLITE_ONLY
def test_reusing_another_cabinets_client_id_gets_none_of_its_messages(fleet: Fleet) -> None:
    """Mosquitto does not tie client ids to users: A may connect with B's client id and
    take over B's persistent session (kicking B off), yet receives none of B's
    coinpulses, neither those queued for B nor later ones."""
    server = fleet.server().start()
    pulse_a, pulse_b = (
        fleet.topic("cabA", TopicKind.COINPULSE),
        fleet.topic("cabB", TopicKind.COINPULSE),
    )
    agent_b = f"agent-{uuid.uuid4().hex[:8]}"
    cab_b = fleet.cabinet("cabB", client_id=agent_b, persistent=True).start()
    cab_b.subscribe(pulse_b)
    cab_b.stop()
    server.publish(pulse_b, b"queued for B")

    thief = fleet.cabinet("cabA", client_id=agent_b, persistent=True).start()
    thief.subscribe(pulse_a)
    server.publish(pulse_b, b"sent while A holds B's session")
    fence = marker()
    server.publish(pulse_a, fence)
    assert thief.wait_for(pulse_a, fence)

    assert thief.received == [(pulse_a, fence)]


def _cli(store: Store, cwd: Path, mqtt_url: str | None) -> subprocess.CompletedProcess[str]:
    """`insertcoin broker mosquitto-config` as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSERTCOIN_", "MQTT_"))}
    env["INSERTCOIN_DATABASE_URL"] = store.settings.database_url
    env["INSERTCOIN_MQTT_TOPIC_PREFIX"] = store.settings.mqtt_topic_prefix
    if mqtt_url is not None:
        env["INSERTCOIN_MQTT_URL"] = mqtt_url
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "insertcoin",
            "broker",
            "mosquitto-config",
            "-o",
            str(store.config_dir),
        ],
        env=env,
        cwd=cwd,  # away from any .env of the checkout
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_rewrite_and_reload_admit_a_new_cabinet(fleet: Fleet, tmp_path: Path) -> None:
    """The documented workflow: after `cabinet add`, the new cabinet is refused until the
    command is run again and Mosquitto gets SIGHUP; then it talks on its own topics,
    and connected clients and the server account keep working across the reload."""
    server = fleet.server().start()
    server.subscribe(fleet.wildcard(TopicKind.ACK))
    fleet.store.add_cabinet("cabC")
    assert fleet.cabinet("cabC").connect().is_failure

    done = _cli(fleet.store, tmp_path, SERVER_URL)
    assert done.returncode == 0, done.stderr
    assert f"include_dir {fleet.store.config_dir.resolve()}\n" in done.stdout
    assert fleet.cabinet("cabC").connect().is_failure, "admitted before the reload"
    assert fleet.broker.process is not None
    fleet.broker.process.send_signal(signal.SIGHUP)

    deadline = time.monotonic() + WAIT
    while (cab_c := fleet.cabinet("cabC")).connect().is_failure:
        assert time.monotonic() < deadline, "still refused after the reload"
        time.sleep(0.05)
    cab_c.publish(fleet.topic("cabC", TopicKind.ACK), b"hello from C")
    assert server.wait_for(fleet.topic("cabC", TopicKind.ACK), b"hello from C")
    fleet.server().start()


@SQLITE_ONLY
@pytest.mark.parametrize("mqtt_url", ["mqtt://127.0.0.1:1883", None], ids=["no-user", "no-url"])
def test_without_a_server_user_the_command_fails_in_one_line(
    store: Store, tmp_path: Path, mqtt_url: str | None
) -> None:
    """Without a user in INSERTCOIN_MQTT_URL (or without the variable) the command writes
    nothing and says what to set in one line, exit code 2, no traceback."""
    store.config_dir = tmp_path / "not-written"
    done = _cli(store, tmp_path, mqtt_url)
    assert done.returncode == 2
    assert done.stderr == NO_SERVER_USER + "\n"
    assert not store.config_dir.exists()


@SQLITE_ONLY
def test_rewrite_replaces_files_and_keeps_the_operators_mode(store: Store) -> None:
    """New files are 0600 (password hashes) and 0644; a rewrite replaces them whole,
    leaves no temporary file, and keeps a mode the operator set."""
    files = store.write_config()
    modes = {p.name: p.stat().st_mode & 0o777 for p in store.config_dir.iterdir()}
    assert modes == {
        files.password_file.name: 0o600,
        files.acl_file.name: 0o644,
        files.conf_file.name: 0o644,
    }
    files.password_file.chmod(0o640)
    store.add_cabinet("cabC")
    store.write_config()

    assert sorted(p.name for p in store.config_dir.iterdir()) == sorted(modes)
    assert files.password_file.stat().st_mode & 0o777 == 0o640
    lines = files.password_file.read_text().splitlines()
    users = [line.split(":")[0] for line in lines if not line.startswith("#")]
    assert users == [SERVER_USER, "cabA", "cabB", "cabC"]


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("mqtt_url", "error"),
    [
        ("mqtt://insertcoin@127.0.0.1:1883", "needs a password for the server account"),
        ("mqtt://in%3Asert:pw@127.0.0.1:1883", "Mosquitto cannot take the user 'in:sert'"),
        # In the password file twice, and the cabinet would get the server's ACL.
        ("mqtt://cabA:pw@127.0.0.1:1883", "the server's user 'cabA' is also a cabinet's"),
    ],
    ids=["no-password", "colon", "a-cabinets-name"],
)
def test_unusable_server_accounts_are_refused(
    store: Store, prefix: str, mqtt_url: str, error: str
) -> None:
    """A server account Mosquitto could not use, or one that is also a cabinet's
    machineId, stops the command before it changes any file."""
    before = {p.name: p.read_bytes() for p in store.config_dir.iterdir()}
    settings = make_settings(store.settings.database_url, mqtt_url, prefix)
    with pytest.raises(ConfigError, match=re.escape(error)):
        write_mosquitto_config(settings, store.db, store.config_dir)
    assert {p.name: p.read_bytes() for p in store.config_dir.iterdir()} == before
