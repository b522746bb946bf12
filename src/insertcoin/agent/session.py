"""The agent's MQTT session (paho-mqtt 2, its own network thread, auto-reconnect).

A persistent session (3.1.1 clean_session=False) under a stable client id, so grants
published while the cabinet is away wait at the broker; the server re-sends them anyway
(PROTOCOL.md section 2), so nothing depends on the broker keeping them.
"""

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from insertcoin.agent.config import AgentConfig
from insertcoin.protocol import TopicKind, Topics

log = structlog.get_logger(__name__)

QOS = 1
KEEPALIVE_SECONDS = 30


def client_id_for(machine_id: str) -> str:
    # ≤ 23 characters (MQTT 3.1.1 brokers such as EMQX Serverless insist), and the same
    # on every start so the broker finds the persistent session again.
    return "ic-" + machine_id[:20]


class Session:
    def __init__(
        self,
        config: AgentConfig,
        *,
        will: bytes,
        on_message: Callable[[TopicKind, bytes], None],
        on_online: Callable[[bool], None],
    ) -> None:
        self.machine_id = config.machine_id
        self.topics = Topics(config.mqtt.topic_prefix)
        self.target = config.mqtt.target
        self._on_message = on_message
        self._on_online = on_online
        self._connected = threading.Event()
        self.client_id = client_id_for(config.machine_id)
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv311,
            clean_session=False,
        )
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            client.tls_set(ca_certs=config.mqtt.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.will_set(self.topic(TopicKind.STATUS), will, qos=QOS, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    def topic(self, kind: TopicKind) -> str:
        return self.topics.topic(self.machine_id, kind)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        self._client.connect_async(self.target.host, self.target.port, keepalive=KEEPALIVE_SECONDS)
        self._client.loop_start()

    def stop(self, farewell: bytes | None = None) -> None:
        """Disconnect cleanly; `farewell` (the offline status) replaces the Will."""
        if farewell is not None and self.connected:
            info = self._client.publish(self.topic(TopicKind.STATUS), farewell, QOS, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def publish(self, kind: TopicKind, payload: bytes, *, retain: bool = False) -> None:
        # While offline paho keeps QoS 1 messages and sends them after reconnecting.
        self._client.publish(self.topic(kind), payload, qos=QOS, retain=retain)

    def _handle_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("mqtt_connect_refused", host=self.target.host, reason=str(reason))
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Acks are tiny; Nagle would hold each one back against the broker's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(
            [(self.topic(TopicKind.COINPULSE), QOS), (self.topic(TopicKind.CONFIG), QOS)]
        )
        self._connected.set()
        log.info("mqtt_connected", host=self.target.host, clientId=self.client_id)
        self._on_online(True)

    def _handle_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        # Our own disconnect (stopping) is news; any other is a problem worth a warning.
        level = "info" if not getattr(reason, "is_failure", True) else "warning"
        getattr(log, level)("mqtt_disconnected", host=self.target.host, reason=str(reason))
        self._on_online(False)

    def _handle_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        if message.topic == self.topic(TopicKind.COINPULSE):
            self._on_message(TopicKind.COINPULSE, bytes(message.payload))
        elif message.topic == self.topic(TopicKind.CONFIG):
            self._on_message(TopicKind.CONFIG, bytes(message.payload))
        else:
            # Ignored: some brokers (amqtt, the embedded one) hand a persistent session
            # retained messages of topics it never subscribed to.
            log.info("mqtt_unexpected_topic", topic=message.topic)
