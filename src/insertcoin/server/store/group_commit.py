"""Group commit: concurrent requests queue here; one thread writes whatever has queued
up in a single transaction (one commit, one fsync, a handful of statements), runs an
after-commit step for each item, then answers each request. At low load a batch is one
request and adds no wait; under load, batches grow by themselves while the previous one
commits.
"""

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

import structlog
from sqlalchemy import Connection

from insertcoin.server.errors import InsertcoinError
from insertcoin.server.store.batches import batches
from insertcoin.server.store.database import Database

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_BATCH = 256


class GroupCommit(Generic[T, R]):
    """`write(conn, items)` returns one result per item, or the domain error that item
    met (which writes nothing for it); `after(result)` runs once the batch committed."""

    def __init__(
        self,
        db: Database,
        name: str,
        write: Callable[[Connection, list[T]], list[R | InsertcoinError]],
        after: Callable[[R], None] | None = None,
    ) -> None:
        self._db = db
        self._name = name
        self._write_batch = write
        self._after = after
        self._queue: queue.Queue[tuple[T, Future[R]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def submit(self, item: T) -> "Future[R]":
        """The item's result once committed (and after-committed); or its error."""
        future: Future[R] = Future()
        self._queue.put((item, future))
        return future

    def _run(self) -> None:
        for batch in batches(self._queue, _BATCH):
            self._write(batch)

    def _write(self, batch: list[tuple[T, "Future[R]"]]) -> None:
        try:
            with self._db.write() as conn:
                results = self._write_batch(conn, [item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                # Find the one at fault: the others still deserve their write.
                log.warning(f"{self._name}_batch_failed", size=len(batch), exc_info=True)
                for entry in batch:
                    self._write([entry])
                return
            log.exception(f"{self._name}_write_failed")
            batch[0][1].set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, InsertcoinError):
                future.set_exception(result)
                continue
            if self._after is not None:
                self._after(result)
            future.set_result(result)
