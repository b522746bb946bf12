"""The real agent against a real server and a real Mosquitto: grants end `applied`, each
creditId is applied once, expired and foreign grants add nothing, session mode plays."""

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from insertcoin.agent.config import parse_config
from insertcoin.agent.journal import Journal
from insertcoin.agent.outputs.simulated import SimulatedOutput
from insertcoin.agent.runner import Agent
from insertcoin.agent.session import client_id_for
from insertcoin.protocol import TopicKind, Topics
from tests.support.messages import coinpulse
from tests.support.server import ServerThread, add_cabinet, comp, grant_state, make_settings
from tests.support.services import Mosquitto, free_port

PULSES_PER_CREDIT = 2


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
    return value


class Watcher:
    """A plain paho client that records every message on the topics it is given."""

    def __init__(self, broker: Mosquitto, topics: list[str]) -> None:
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:8]}"
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, orjson.loads(message.payload), message.retain))

    def find(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [
                body
                for topic, body, _ in self.messages
                if topic.endswith("/" + kind) and all(body.get(k) == v for k, v in match.items())
            ]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_agent(
    server: ServerThread, broker: Mosquitto, topics: Topics, tmp_path: Path, mode: str
) -> tuple[Agent, SimulatedOutput, str]:
    machine_id = f"cab-{uuid.uuid4().hex[:8]}"
    cabinet = add_cabinet(server.admin, machine_id)
    password = cabinet["mqtt"]["password"]
    config = parse_config(
        {
            "machine_id": machine_id,
            "mqtt": {
                "url": f"mqtt://{machine_id}:{password}@127.0.0.1:{broker.port}",
                "topic_prefix": topics.prefix,
            },
            "journal": {"path": str(tmp_path / "agent.db")},
            "coin": {"mode": mode, "output": "simulated", "pulses_per_credit": PULSES_PER_CREDIT},
            "screen": {"listen": f"127.0.0.1:{free_port()}"},
        }
    )
    output = SimulatedOutput()
    agent = Agent(config, output=output)
    agent.start()
    assert agent.wait_online(10)
    return agent, output, machine_id


def test_pulse_mode_applies_each_grant_once(
    server: ServerThread, broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    """A comp grant of 2 ends `applied` with exactly 2 x pulses_per_credit pulses; a
    re-delivered duplicate is re-acked `applied` and adds nothing; an expired grant is
    rejected; a grant naming another machine on our topic is ignored."""
    agent, output, machine_id = start_agent(server, broker, topics, tmp_path, "pulse")
    ack_topic = topics.topic(machine_id, TopicKind.ACK)
    coinpulse_topic = topics.topic(machine_id, TopicKind.COINPULSE)
    watcher = Watcher(broker, [ack_topic])
    try:
        credit_id = comp(server, machine_id, 2)
        wait_until(lambda: grant_state(server, credit_id) == "applied")
        assert output.pulses == {credit_id: 2 * PULSES_PER_CREDIT}

        watcher.publish(coinpulse_topic, coinpulse(machine_id, credit_id))
        wait_until(lambda: len(watcher.find("ack", creditId=credit_id, result="applied")) >= 2)
        assert output.total == 2 * PULSES_PER_CREDIT

        watcher.publish(coinpulse_topic, coinpulse("someone-else", "cr_foreign"))
        watcher.publish(coinpulse_topic, coinpulse(machine_id, "cr_expired", expires_in=-1))
        [rejected] = wait_until(lambda: watcher.find("ack", creditId="cr_expired"))
        assert (rejected["result"], rejected["reason"]) == ("rejected", "expired")
        # Grants are handled in order, so the foreign one was already seen and dropped.
        assert watcher.find("ack", creditId="cr_foreign") == []
        assert output.total == 2 * PULSES_PER_CREDIT
        assert agent.snapshot()["credits"] == 0
        assert wait_until(lambda: agent.snapshot()["payUrl"])
    finally:
        watcher.stop()
        agent.stop()


def test_session_mode_plays_one_credit_per_game(
    server: ServerThread, broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    """Session mode: 3 credits start a game with one (2 held, playing); a game over spends
    the next and publishes `gameover` with creditsLeft; the retained status follows."""
    agent, output, machine_id = start_agent(server, broker, topics, tmp_path, "session")
    watcher = Watcher(broker, [topics.topic(machine_id, TopicKind.GAMEOVER)])
    changes: list[dict[str, Any]] = []
    agent.subscribe(lambda: changes.append(agent.snapshot()))
    try:
        credit_id = comp(server, machine_id, 3)
        wait_until(lambda: grant_state(server, credit_id) == "applied")
        snapshot = agent.snapshot()
        assert (snapshot["state"], snapshot["credits"]) == ("playing", 2)
        assert output.total == PULSES_PER_CREDIT

        after = agent.game_over()
        assert (after["state"], after["credits"]) == ("playing", 1)
        [over] = wait_until(lambda: watcher.find("gameover"))
        assert (over["status"], over["creditsLeft"]) == ("game_over", 1)
        assert output.total == 2 * PULSES_PER_CREDIT
        assert any(c["credits"] == 1 and c["state"] == "playing" for c in changes)

        retained = Watcher(broker, [topics.topic(machine_id, TopicKind.STATUS)])
        try:
            [status] = wait_until(lambda: retained.find("status"))
            assert (status["online"], status["state"], status["credits"]) == (True, "playing", 1)
        finally:
            retained.stop()

        agent.game_over()
        assert agent.game_over()["state"] == "attract"
        assert agent.snapshot()["credits"] == 0
        with pytest.raises(ValueError, match="no game is running"):
            agent.game_over()
        wait_until(lambda: len(watcher.find("gameover")) == 3)
        assert watcher.find("gameover")[-1]["creditsLeft"] == 0
    finally:
        watcher.stop()
        agent.stop()


def test_an_apply_whose_every_ack_was_lost_is_reported_on_coming_back(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The agent applied a grant, then was out of reach until after expiresAt + grace
    with every ack lost, so the server marked the grant expired. Coming online, the
    agent's retained status names its latest applied creditIds, and the server records
    the grant as applied after all (`applied_late` in its history)."""
    topics = Topics(f"t/{uuid.uuid4().hex[:8]}")
    settings = make_settings(
        f"sqlite:///{tmp_path / 'server.db'}", broker.url, topics.prefix, credit_ttl_seconds=0.5
    )
    server = ServerThread(settings)
    watcher = Watcher(broker, [f"{topics.prefix}/+/status"])
    try:
        agent, _, machine_id = start_agent(server, broker, topics, tmp_path, "pulse")
        agent.stop()  # out of reach from here on
        credit_id = comp(server, machine_id, 1)
        wait_until(lambda: grant_state(server, credit_id) == "expired")
        # What the lost acks stood for: the agent took the grant and journaled it. And
        # the broker lost the re-sends it held for the agent (a restart without its data).
        journal = Journal(tmp_path / "agent.db")
        journal.record(credit_id, 1)
        journal.close()
        forget_session(broker, client_id_for(machine_id))

        agent, _, _ = start_agent_again(agent, tmp_path)
        try:
            wait_until(lambda: grant_state(server, credit_id) == "applied")
            reported = [
                status["appliedCreditIds"]
                for status in watcher.find("status", machineId=machine_id, online=True)
                if "appliedCreditIds" in status
            ]
            assert reported == [[credit_id]]
            history = server.admin.get(f"/api/grants/{credit_id}").json()["history"]
            assert [e["event"] for e in history][-1] == "applied_late"
        finally:
            agent.stop()
    finally:
        watcher.stop()
        server.stop()


def forget_session(broker: Mosquitto, client_id: str) -> None:
    """Drop the broker's persistent session of `client_id`, and what it queued."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    wait_until(client.is_connected)
    client.disconnect()
    client.loop_stop()


def start_agent_again(agent: Agent, tmp_path: Path) -> tuple[Agent, SimulatedOutput, str]:
    """The same cabinet's agent, with the same config and journal, started again."""
    output = SimulatedOutput()
    again = Agent(agent.config, output=output)
    again.start()
    assert again.wait_online(10)
    return again, output, agent.machine_id
