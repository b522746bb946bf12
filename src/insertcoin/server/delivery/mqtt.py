"""The server's MQTT connection (paho-mqtt 2, its own network thread, auto-reconnect).

A clean session: the database, not the broker, remembers what is owed, and EMQX advises
clean sessions for shared subscribers. On every (re)connect it subscribes again and
tells the owner, who re-publishes the retained configs (a broker may have lost them).
"""

import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from insertcoin.mqtt_url import MqttTarget

log = structlog.get_logger(__name__)

QOS = 1


class MqttLink:
    def __init__(
        self,
        target: MqttTarget,
        *,
        subscriptions: list[str],
        on_message: Callable[[str, bytes], None],
        on_connect: Callable[[], None] = lambda: None,
        ca_file: Path | None = None,
        client_id: str | None = None,
    ) -> None:
        self.target = target
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_connect_hook = on_connect
        self._connected = threading.Event()
        # ≤ 23 characters, for brokers that speak only MQTT 3.1.1 strictly.
        self.client_id = client_id or f"ic-srv-{uuid.uuid4().hex[:16]}"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if target.username:
            client.username_pw_set(target.username, target.password)
        if target.tls:
            client.tls_set(ca_certs=str(ca_file) if ca_file else None, cert_reqs=ssl.CERT_REQUIRED)
        client.max_inflight_messages_set(1000)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._client.connect_async(self.target.host, self.target.port, keepalive=30)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Queue a QoS 1 publish; False if not connected (the outbox will re-send)."""
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def _handle_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("mqtt_connect_refused", broker=self.target.display(), reason=str(reason))
            return
        # Without TCP_NODELAY each small QoS 1 publish waits out Nagle's algorithm
        # against the broker's delayed ACK: about 20 ms per coinpulse on Linux.
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._subscriptions:
            client.subscribe([(topic, QOS) for topic in self._subscriptions])
        self._connected.set()
        log.info("mqtt_connected", broker=self.target.display(), clientId=self.client_id)
        self._on_connect_hook()

    def _handle_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        # Our own disconnect (stopping) is news; any other is a problem worth a warning.
        level = "info" if not getattr(reason, "is_failure", True) else "warning"
        getattr(log, level)("mqtt_disconnected", broker=self.target.display(), reason=str(reason))

    def _handle_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self._on_message(message.topic, bytes(message.payload))
