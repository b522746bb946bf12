"""Feeds MQTT messages from cabinets to `CabinetEvents` in batches, off the network thread.

Bad messages are logged and dropped here, never reaching the database. A batch that
fails is retried message by message, so one message the database refuses cannot take
the others down with it; while the database is away, each is retried a few times and
then dropped. A lost ack heals because the dispatcher re-sends the grant and the
cabinet re-acks it; a lost status is superseded by the next one.
"""

import queue
import threading
import time

import structlog

from insertcoin.protocol.errors import ProtocolError
from insertcoin.protocol.topics import Topics
from insertcoin.server.delivery.events import CabinetEvents, CabinetMessage, decode
from insertcoin.server.store.batches import batches

log = structlog.get_logger(__name__)

_BATCH = 500
_TRIES = 5
# Acks are not urgent, grants are: an ack handled the moment it arrives holds the write
# lock just when the next grant wants it (at concurrency 1 that cost every grant 1 ms
# more to reach its cabinet). Lingering lets grants go first and makes bigger batches.
_LINGER_SECONDS = 0.005


class Listener:
    def __init__(self, topics: Topics, events: CabinetEvents) -> None:
        self._topics = topics
        self._events = events
        self._queue: queue.Queue[CabinetMessage | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)

    def submit(self, topic: str, payload: bytes) -> None:
        """Called on the MQTT network thread for every message received."""
        try:
            self._queue.put(decode(self._topics, topic, payload))
        except ProtocolError as exc:
            log.warning("message_rejected", topic=topic, reason=exc.reason, size=len(payload))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        for batch in batches(self._queue, _BATCH, _LINGER_SECONDS):
            self.process(batch)

    def process(self, batch: list[CabinetMessage]) -> None:
        """Apply a batch; on failure, each message on its own."""
        try:
            self._events.handle(batch)
            return
        except Exception:
            if len(batch) > 1:
                log.warning("listener_batch_failed", size=len(batch), exc_info=True)
        for message in batch:
            self._handle_one(message)

    def _handle_one(self, message: CabinetMessage) -> None:
        for attempt in range(1, _TRIES + 1):
            try:
                self._events.handle([message])
                return
            except Exception:
                log.exception(
                    "listener_message_failed", machineId=message.machine_id, attempt=attempt
                )
                if not self._database_is_away():
                    break  # the message itself is at fault: retrying cannot help
                time.sleep(min(attempt, 3))
        log.error(
            "listener_message_dropped",
            machineId=message.machine_id,
            kind=type(message.message).__name__,
        )

    def _database_is_away(self) -> bool:
        try:
            self._events.check()
        except Exception:
            return True
        return False
