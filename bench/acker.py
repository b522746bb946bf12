"""A lean benchmark cabinet: one paho client that plays every cabinet under a prefix,
acks each `coinpulse` as `applied` at once, and records when each one arrived.

Run as its own process so it never shares a GIL with the load generator:

    python -m bench.acker mqtt://127.0.0.1:1883 arcade/machine records.json

It prints `ready` once subscribed, runs until its standard input closes, then writes
`{"received": [[creditId, unix_time], ...], ...}` to the records file. It does only what
an agent must on the wire (parse, ack QoS 1), with no journal, so that it stays far
from being the bottleneck; `bench.delivery` measures its ceiling in every run.
"""

import argparse
import os
import sys
import threading
import time
import uuid
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from insertcoin.mqtt_url import parse_mqtt_url


def _timestamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class Acker:
    def __init__(self, broker_url: str, prefix: str, *, watch_acks: bool = False) -> None:
        self.prefix = prefix
        self.watch_acks = watch_acks
        self.received: list[tuple[str, float]] = []
        self.acks_seen: list[tuple[str, float]] = []
        self.malformed = 0
        self.ready = threading.Event()
        target = parse_mqtt_url(broker_url)
        self.target = target
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-acker-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if target.username:
            client.username_pw_set(target.username, target.password)
        client.max_inflight_messages_set(0)  # unlimited: acks never wait on a window
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    def start(self) -> None:
        self.client.connect(self.target.host, self.target.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        topics = [(f"{self.prefix}/+/coinpulse", 1)]
        if self.watch_acks:  # diagnostics: when did each ack come back out of the broker?
            topics.append((f"{self.prefix}/+/ack", 0))
        client.subscribe(topics)

    def _on_subscribe(self, *_: Any) -> None:
        self.ready.set()

    def _on_message(self, client: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        now = time.time()
        if message.topic.endswith("/ack"):
            self.acks_seen.append((orjson.loads(message.payload)["creditId"], now))
            return
        try:
            pulse = orjson.loads(message.payload)
            credit_id, machine_id = pulse["creditId"], pulse["machineId"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.malformed += 1
            return
        self.received.append((credit_id, now))
        ack = {
            "machineId": machine_id,
            "creditId": credit_id,
            "result": "applied",
            "timestamp": _timestamp(now),
        }
        client.publish(f"{self.prefix}/{machine_id}/ack", orjson.dumps(ack), qos=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("broker_url")
    parser.add_argument("prefix")
    parser.add_argument("records")
    parser.add_argument("--watch-acks", action="store_true", help="also record acks seen")
    args = parser.parse_args()
    acker = Acker(args.broker_url, args.prefix, watch_acks=args.watch_acks)
    acker.start()
    if not acker.ready.wait(10):
        sys.exit("acker: not subscribed after 10 s")
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    acker.stop()
    times = os.times()
    with open(args.records, "wb") as out:
        out.write(
            orjson.dumps(
                {
                    "received": acker.received,
                    "acks_seen": acker.acks_seen,
                    "malformed": acker.malformed,
                    "cpu_seconds": times.user + times.system,
                }
            )
        )


if __name__ == "__main__":
    main()
