"""The credit delivery engine end to end: operator API → outbox → MQTT → cabinet → ack."""

import time

from tests.support.cabinet import FakeCabinets
from tests.support.server import ServerThread, make_settings


def _add_cabinet(server: ServerThread, machine_id: str) -> dict:
    response = server.admin.post(
        "/api/cabinets",
        json={
            "machineId": machine_id,
            "name": f"Cabinet {machine_id}",
            "price": {"amount": 100, "currency": "usd"},
        },
    )
    assert response.status_code == 201, response.text
    return response.json()


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
