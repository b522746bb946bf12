"""The credit delivery engine end to end: operator API → outbox → MQTT → cabinet → ack."""

import threading
import time
import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from insertcoin.mqtt_url import parse_mqtt_url
from insertcoin.protocol import CabinetConfig, Status, dump_message, parse_message
from insertcoin.protocol.topics import TopicKind
from tests.support.cabinet import FakeCabinets
from tests.support.server import ServerThread, add_cabinet, make_settings
from tests.support.services import mosquitto


def _add_cabinet(server: ServerThread, machine_id: str) -> dict:
    return add_cabinet(server.admin, machine_id)


def _wait_state(server: ServerThread, credit_id: str, state: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        grant = server.admin.get(f"/api/grants/{credit_id}").json()
        if grant["state"] == state or time.monotonic() > deadline:
            return grant
        time.sleep(0.05)


def test_comp_grant_is_delivered_and_applied_once(server: ServerThread, broker_url, topics):
    """A comp grant reaches its cabinet as a coinpulse and ends `applied` after the ack."""
    _add_cabinet(server, "cab1")
    cabinet = FakeCabinets(broker_url, topics, ["cab1"]).start()
    try:
        created = server.admin.post(
            "/api/cabinets/cab1/credits", json={"credits": 3, "reason": "birthday"}
        )
        assert created.status_code == 201, created.text
        credit_id = created.json()["creditId"]
        grant = _wait_state(server, credit_id, "applied")
        assert grant["state"] == "applied"
        assert cabinet.applied == {credit_id: 3}
        events = [h["event"] for h in grant["history"]]
        assert events == ["created", "applied"]
    finally:
        cabinet.stop()


def test_unacked_grant_is_resent_then_expires(db_url, broker, broker_url, prefix, topics):
    """Without an ack the same creditId is re-sent with backoff, then marked expired."""
    server = ServerThread(
        make_settings(
            db_url,
            broker_url,
            prefix,
            credit_ttl_seconds=1.5,
            mqtt_shared_subscriptions=broker.shared_subscriptions,
        )
    )
    cabinet = FakeCabinets(broker_url, topics, ["mute"], ack=False)
    try:
        _add_cabinet(server, "mute")
        cabinet.start()
        credit_id = server.admin.post(
            "/api/cabinets/mute/credits", json={"credits": 1, "reason": "test"}
        ).json()["creditId"]
        grant = _wait_state(server, credit_id, "expired", timeout=5)
        assert grant["state"] == "expired"
        assert cabinet.received[credit_id] >= 2  # re-sent with the same creditId
        assert grant["attempts"] == cabinet.received[credit_id] or grant["attempts"] >= 2
        # A late ack after expiry is recorded but the grant is settled as the cabinet says.
        cabinet.send_ack("mute", credit_id, "rejected", "expired")
        time.sleep(0.3)
        assert server.admin.get(f"/api/grants/{credit_id}").json()["state"] == "expired"
    finally:
        cabinet.stop()
        server.stop()


def test_offline_cabinet_past_expiry_gets_no_credit(db_url, broker, broker_url, prefix, topics):
    """A cabinet away past expiresAt: the grant expires; when the cabinet returns, the
    stale coinpulse (if the broker still queued it) is rejected and adds no credit."""
    server = ServerThread(
        make_settings(
            db_url,
            broker_url,
            prefix,
            credit_ttl_seconds=1.0,
            mqtt_shared_subscriptions=broker.shared_subscriptions,
        )
    )
    client_id = "fc-offline-cab"
    try:
        _add_cabinet(server, "away")
        FakeCabinets(broker_url, topics, ["away"], client_id=client_id).start().stop()
        credit_id = server.admin.post(
            "/api/cabinets/away/credits", json={"credits": 1, "reason": "t"}
        ).json()["creditId"]
        assert _wait_state(server, credit_id, "expired", timeout=5)["state"] == "expired"
        back = FakeCabinets(broker_url, topics, ["away"], client_id=client_id).start()
        try:
            time.sleep(1.0)  # time for a queued coinpulse, if the broker kept one
            assert back.applied == {}
            assert back.credits["away"] == 0
            grant = server.admin.get(f"/api/grants/{credit_id}").json()
            assert grant["state"] == "expired"
        finally:
            back.stop()
    finally:
        server.stop()


def test_config_is_published_retained_and_follows_changes(server: ServerThread, broker_url, topics):
    """Creating or changing a cabinet publishes its retained `config`; a cabinet that
    connects later still gets the latest one."""
    _add_cabinet(server, "cfg1")
    patched = server.admin.patch(
        "/api/cabinets/cfg1", json={"name": "Renamed", "price": {"amount": 250, "currency": "eur"}}
    )
    assert patched.status_code == 200, patched.text
    time.sleep(0.5)
    got = _retained(broker_url, topics.topic("cfg1", TopicKind.CONFIG))
    assert got is not None
    config = parse_message(CabinetConfig, got)
    assert config.name == "Renamed"
    assert config.price.amount == 250
    assert config.price.currency == "eur"
    assert config.pay_url == f"{server.settings.public_url}/pay/cfg1"


def test_status_and_last_will_drive_presence(server: ServerThread, broker_url, topics):
    """An online status marks the cabinet online with its state and credits; the Will
    (online:false, nothing else) marks it offline and keeps the last known credits."""
    _add_cabinet(server, "pres")
    cabinet = FakeCabinets(broker_url, topics, ["pres"]).start()
    try:
        deadline = time.monotonic() + 5
        while not server.admin.get("/api/cabinets/pres").json()["online"]:
            assert time.monotonic() < deadline, "status never arrived"
            time.sleep(0.05)
        view = server.admin.get("/api/cabinets/pres").json()
        assert view["state"] == "attract"
        assert view["credits"] == 0
        assert view["lastSeen"]
        will = dump_message(Status(machine_id="pres", online=False))
        cabinet.client.publish(topics.topic("pres", TopicKind.STATUS), will, qos=1, retain=True)
        deadline = time.monotonic() + 5
        while server.admin.get("/api/cabinets/pres").json()["online"]:
            assert time.monotonic() < deadline, "Will never marked it offline"
            time.sleep(0.05)
        assert server.admin.get("/api/cabinets/pres").json()["credits"] == 0
    finally:
        cabinet.stop()


def test_metrics_count_grants_by_state(server: ServerThread, broker_url, topics):
    """/metrics reports grants by state from the database and delivery latency."""
    _add_cabinet(server, "met")
    cabinet = FakeCabinets(broker_url, topics, ["met"]).start()
    try:
        credit_id = server.admin.post(
            "/api/cabinets/met/credits", json={"credits": 1, "reason": "m"}
        ).json()["creditId"]
        assert _wait_state(server, credit_id, "applied")["state"] == "applied"
        text = server.admin.get("/metrics").text
        assert 'insertcoin_grants{state="applied"} 1.0' in text
        assert 'insertcoin_grants{state="pending"} 0.0' in text
        assert "insertcoin_grant_delivery_seconds_count 1.0" in text
        assert "insertcoin_cabinets_online 1.0" in text
    finally:
        cabinet.stop()


def _retained(broker_url: str, topic: str, timeout: float = 3.0) -> bytes | None:
    """Subscribe with a fresh client and return the retained message on `topic`."""
    target = parse_mqtt_url(broker_url)
    got: list[bytes] = []
    arrived = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rt-{uuid.uuid4().hex[:8]}")

    def on_message(_c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        got.append(message.payload)
        arrived.set()

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(topic, 1)
    client.connect(target.host, target.port)
    client.loop_start()
    try:
        arrived.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1] if got else None


def test_grants_expire_on_time_while_the_broker_is_down(db_url, tmp_path, prefix):
    """With the broker gone, nothing can be sent, but a grant still ends `expired` once
    its grace has passed (GUARANTEES G2: final within TTL + grace + one period)."""
    (tmp_path / "mq").mkdir()
    with mosquitto(tmp_path / "mq") as broker:
        server = ServerThread(make_settings(db_url, broker.url, prefix, credit_ttl_seconds=1.0))
        try:
            _add_cabinet(server, "dark")
            broker.stop()
            deadline = time.monotonic() + 5
            while server.runtime.link.connected:
                assert time.monotonic() < deadline, "server never noticed the broker left"
                time.sleep(0.05)
            created = server.admin.post(
                "/api/cabinets/dark/credits", json={"credits": 1, "reason": "dark"}
            )
            assert created.status_code == 201, created.text
            grant = _wait_state(server, created.json()["creditId"], "expired", timeout=5)
            assert grant["state"] == "expired"
            assert not server.runtime.link.connected
        finally:
            server.stop()
