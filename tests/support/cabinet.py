"""A stand-in cabinet for server tests: a real MQTT client that receives `coinpulse`,
remembers every creditId it applied, and acks like an agent would (re-acks duplicates,
rejects expired grants). One client can play many cabinets."""

import socket
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from insertcoin.mqtt_url import parse_mqtt_url
from insertcoin.protocol import (
    Ack,
    CoinPulse,
    ProtocolError,
    Status,
    Topics,
    dump_message,
    parse_message,
)
from insertcoin.protocol.topics import TopicKind


class FakeCabinets:
    def __init__(
        self,
        broker_url: str,
        topics: Topics,
        machine_ids: list[str],
        *,
        ack: bool = True,
        client_id: str | None = None,
        persistent: bool = True,
    ) -> None:
        self.topics = topics
        self.machine_ids = set(machine_ids)
        self.ack = ack
        self.received: Counter[str] = Counter()  # coinpulse deliveries per creditId
        self.applied: dict[str, int] = {}  # creditId → credits, applied once each
        self.credits: Counter[str] = Counter()  # machineId → credits applied
        self.rejected: dict[str, str] = {}
        self.invalid = 0  # unusable payloads, ignored as an agent would
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        target = parse_mqtt_url(broker_url)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"fc-{uuid.uuid4().hex[:12]}",
            protocol=paho.MQTTv311,
            clean_session=not persistent,
        )
        if target.username:
            self.client.username_pw_set(target.username, target.password)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self._target = target

    def start(self, timeout: float = 10.0) -> "FakeCabinets":
        self.client.connect_async(self._target.host, self._target.port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError("fake cabinet could not connect")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket):  # as the agent does: no Nagle delay on acks
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe([(self.topics.topic(m, TopicKind.COINPULSE), 1) for m in self.machine_ids])
        for machine_id in self.machine_ids:
            self.publish_status(machine_id, online=True)
        self._connected.set()

    def publish_status(self, machine_id: str, *, online: bool) -> None:
        status = Status(
            machine_id=machine_id,
            online=online,
            state="attract",
            credits=self.credits[machine_id],
            timestamp=datetime.now(UTC),
        )
        self.client.publish(
            self.topics.topic(machine_id, TopicKind.STATUS),
            dump_message(status),
            qos=1,
            retain=True,
        )

    def _on_message(self, client: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        try:
            pulse = parse_message(CoinPulse, message.payload)
        except ProtocolError:
            with self.changed:
                self.invalid += 1
            return
        reason: str | None = None
        with self.changed:
            self.received[pulse.credit_id] += 1
            if pulse.credit_id in self.applied:
                result = "applied"
            elif pulse.expires_at <= datetime.now(UTC):
                result, reason = "rejected", "expired"
                self.rejected[pulse.credit_id] = reason
            else:
                self.applied[pulse.credit_id] = pulse.credits
                self.credits[pulse.machine_id] += pulse.credits
                result = "applied"
            self.changed.notify_all()
        if self.ack:
            self.send_ack(pulse.machine_id, pulse.credit_id, result, reason)

    def send_ack(
        self, machine_id: str, credit_id: str, result: str = "applied", reason: str | None = None
    ) -> None:
        ack = Ack(
            machine_id=machine_id,
            credit_id=credit_id,
            result=result,  # type: ignore[arg-type]
            reason=reason,
            timestamp=datetime.now(UTC),
        )
        self.client.publish(self.topics.topic(machine_id, TopicKind.ACK), dump_message(ack), qos=1)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)
