"""The attract screen of a real agent (session mode, simulated output) connected to a real
Mosquitto and a real server, in Chromium: its QR is the server's payUrl, and a comp grant
shows on the page within a second of the coinpulse, without a reload."""

import io
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import zxingcpp
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image
from playwright.sync_api import Browser, Page

from insertcoin.agent.config import parse_config
from insertcoin.agent.outputs.simulated import SimulatedOutput
from insertcoin.agent.runner import Agent
from insertcoin.protocol import TopicKind, Topics
from tests.support.server import ServerThread, add_cabinet
from tests.support.services import Mosquitto, free_port


class Recorder:
    """A paho subscriber that keeps each message's body and arrival time (monotonic)."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self.arrived = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"r-{uuid.uuid4().hex}")
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        at = time.monotonic()
        with self.arrived:
            self.messages.append((at, orjson.loads(message.payload)))
            self.arrived.notify_all()

    def first(self, timeout: float = 10) -> tuple[float, dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: self.messages, timeout), "nothing arrived"
            return self.messages[0]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def cabinet(
    server: ServerThread, broker: Mosquitto, topics: Topics, tmp_path: Path
) -> Iterator[tuple[Agent, str]]:
    """A registered cabinet's agent, online, with its screen listening on a free port."""
    machine_id = f"cab-{uuid.uuid4().hex[:8]}"
    password = add_cabinet(server.admin, machine_id)["mqtt"]["password"]
    port = free_port()
    config = parse_config(
        {
            "machine_id": machine_id,
            "mqtt": {
                "url": f"mqtt://{machine_id}:{password}@127.0.0.1:{broker.port}",
                "topic_prefix": topics.prefix,
            },
            "journal": {"path": str(tmp_path / "agent.db")},
            "coin": {"mode": "session", "output": "simulated"},
            "screen": {"listen": f"127.0.0.1:{port}"},
        }
    )
    agent = Agent(config, output=SimulatedOutput())
    agent.start()
    try:
        assert agent.wait_online(10)
        yield agent, f"http://127.0.0.1:{port}/"
    finally:
        agent.stop()


def _credits_text(tv: Page) -> str:
    return tv.locator("#credits").text_content() or ""


def test_live_agent_screen_shows_pay_url_and_grants(
    cabinet: tuple[Agent, str],
    browser: Browser,
    broker: Mosquitto,
    topics: Topics,
    server: ServerThread,
) -> None:
    """The QR on the real agent's page decodes to the payUrl of the server's retained
    `config`; a comp grant of 2 changes the credits shown within 1 s of its coinpulse
    reaching the broker's subscribers, in the same page (no reload)."""
    agent, url = cabinet
    machine_id = agent.machine_id
    config = Recorder(broker, topics.topic(machine_id, TopicKind.CONFIG))
    coinpulses = Recorder(broker, topics.topic(machine_id, TopicKind.COINPULSE))
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    context.set_default_timeout(10_000)
    try:
        _, retained = config.first()
        pay_url = retained["payUrl"]
        tv = context.new_page()
        tv.goto(url)
        tv.wait_for_function(
            "() => { const q = document.getElementById('qr');"
            " return !q.hidden && q.complete && q.naturalWidth > 0; }"
        )
        decoded = zxingcpp.read_barcodes(Image.open(io.BytesIO(tv.screenshot())))
        assert [barcode.text for barcode in decoded] == [pay_url]
        assert _credits_text(tv) == "0"
        tv.evaluate("window.marker = 'still here'")

        response = server.admin.post(
            f"/api/cabinets/{machine_id}/credits", json={"credits": 2, "reason": "t"}
        )
        assert response.status_code == 201, response.text
        deadline = time.monotonic() + 5
        while _credits_text(tv) == "0":
            assert time.monotonic() < deadline, "the credits on the page never changed"
            time.sleep(0.005)
        shown_at = time.monotonic()
        pulsed_at, pulse = coinpulses.first()
        assert pulse["creditId"] == response.json()["creditId"]
        assert shown_at - pulsed_at < 1.0
        assert tv.evaluate("window.marker") == "still here"
    finally:
        context.close()
        config.stop()
        coinpulses.stop()
