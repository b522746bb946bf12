"""Baselines through the broker: a bare paho QoS 1 publish → receive round, and the
benchmark cabinet's (acker's) own ceiling."""

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.services import AckerProcess, process_cpu_seconds
from bench.stats import latency_ms
from insertcoin.mqtt_url import parse_mqtt_url

# A coinpulse-sized payload (the real one is about 170 bytes).
PAYLOAD = orjson.dumps(
    {
        "machineId": "cab00",
        "credits": 1,
        "timestamp": "2024-07-01T12:00:00.000Z",
        "creditId": "cr_" + "0" * 32,
        "expiresAt": "2024-07-01T12:02:00.000Z",
    }
)


def _client(broker_url: str, name: str) -> paho.Client:
    target = parse_mqtt_url(broker_url)
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-{name}-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    client.max_inflight_messages_set(0)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(target.host, target.port, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        raise TimeoutError(f"{name}: cannot connect to {broker_url}")
    return client


def _subscribe(client: paho.Client, topic: str) -> None:
    done = threading.Event()
    client.on_subscribe = lambda *_: done.set()
    client.subscribe(topic, qos=1)
    if not done.wait(10):
        raise TimeoutError(f"no SUBACK for {topic}")


def paho_round_trip(broker_url: str, count: int = 500, warmup: int = 50) -> dict[str, Any]:
    """One message at a time, QoS 1, from one paho client to another (each with its own
    network thread, as in the server and the cabinet): publish() call → on_message."""
    topic = f"bench/baseline/{uuid.uuid4().hex[:8]}"
    arrived = threading.Event()
    received_at = [0.0]
    sub = _client(broker_url, "sub")
    pub = _client(broker_url, "pub")

    def on_message(*_: Any) -> None:
        received_at[0] = time.perf_counter()
        arrived.set()

    sub.on_message = on_message
    _subscribe(sub, topic)
    samples: list[float] = []
    try:
        for i in range(warmup + count):
            arrived.clear()
            start = time.perf_counter()
            pub.publish(topic, PAYLOAD, qos=1)
            if not arrived.wait(5):
                raise TimeoutError("baseline message not received within 5 s")
            if i >= warmup:
                samples.append(received_at[0] - start)
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()
    return latency_ms(samples)


def acker_ceiling(
    broker_url: str,
    workdir: Path,
    count: int = 10_000,
    cabinets: int = 32,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Flood a fresh acker with `count` coinpulses from one paho client and time the acks.

    The end-to-end rate is a lower bound (one Python publisher feeds it); the acker's CPU
    per message gives its own single-core ceiling."""
    prefix = f"bench/ceiling-{uuid.uuid4().hex[:6]}"
    acker = AckerProcess(broker_url, prefix, workdir, env)
    feeder = _client(broker_url, "feeder")
    acked = [0]
    last = [0.0]
    done = threading.Event()

    def on_ack(*_: Any) -> None:
        acked[0] += 1
        last[0] = time.perf_counter()
        if acked[0] >= count:
            done.set()

    feeder.on_message = on_ack
    _subscribe(feeder, f"{prefix}/+/ack")
    payloads = [
        (
            f"{prefix}/cab{i % cabinets:02d}/coinpulse",
            orjson.dumps(
                {
                    "machineId": f"cab{i % cabinets:02d}",
                    "credits": 1,
                    "creditId": f"cr_ceiling_{i:08d}",
                    "timestamp": "2024-07-01T12:00:00.000Z",
                    "expiresAt": "2024-07-01T12:02:00.000Z",
                }
            ),
        )
        for i in range(count)
    ]
    cpu_before = process_cpu_seconds(acker.pid) or 0.0
    start = time.perf_counter()
    for topic, payload in payloads:
        feeder.publish(topic, payload, qos=1)
    published = time.perf_counter()
    done.wait(60)
    cpu = (process_cpu_seconds(acker.pid) or 0.0) - cpu_before
    feeder.disconnect()
    feeder.loop_stop()
    acker.stop()
    span = last[0] - start
    return {
        "messages": count,
        "acked": acked[0],
        "seconds": round(span, 3),
        "publish_seconds": round(published - start, 3),
        "acks_per_second_end_to_end": round(acked[0] / span, 1) if span > 0 else None,
        "acker_cpu_us_per_message": round(cpu / count * 1e6, 1),
        "acker_single_core_ceiling_per_second": round(count / cpu, 1) if cpu > 0 else None,
    }
