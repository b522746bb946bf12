"""Group commit for new grants.

Concurrent requests queue here; one thread writes whatever has queued up in a single
transaction (one commit, one fsync, a handful of statements), publishes the grants, and
then answers each request. At low load a batch is one request and adds no wait; under
load, batches grow by themselves while the previous one commits.
"""

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import structlog

from insertcoin.protocol.messages import CoinPulse
from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.delivery import grants
from insertcoin.server.delivery.batches import batches
from insertcoin.server.store.database import Database

log = structlog.get_logger(__name__)

_BATCH = 256

_Item = tuple[grants.GrantRequest, "Future[CoinPulse]"]


class GrantWriter:
    def __init__(
        self, db: Database, schedule: grants.Schedule, send: Callable[[CoinPulse], None]
    ) -> None:
        self._db = db
        self._schedule = schedule
        self._send = send
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="grant-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def submit(self, request: grants.GrantRequest) -> "Future[CoinPulse]":
        """The grant, once committed and published; or the domain error it met."""
        future: Future[CoinPulse] = Future()
        self._queue.put((request, future))
        return future

    def _run(self) -> None:
        for batch in batches(self._queue, _BATCH):
            self._write(batch)

    def _write(self, batch: list[_Item]) -> None:
        try:
            with self._db.write() as conn:
                results = grants.create_many(
                    conn, [request for request, _ in batch], now=utc_now(), schedule=self._schedule
                )
        except Exception as exc:
            if len(batch) > 1:
                # Find the one at fault: the others still deserve their grant.
                log.warning("grant_batch_failed", size=len(batch), exc_info=True)
                for item in batch:
                    self._write([item])
                return
            log.exception("grant_write_failed", machineId=batch[0][0].machine_id)
            batch[0][1].set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, CoinPulse):
                self._send(result)
                future.set_result(result)
            else:
                future.set_exception(result)
