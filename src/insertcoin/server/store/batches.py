"""Draining a work queue in batches, for the threads that write to the database: one
transaction (one commit, one fsync) for whatever queued up while the last one ran."""

import queue
import time
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def batches(work: "queue.Queue[T | None]", limit: int, linger: float = 0.0) -> Iterator[list[T]]:
    """Yield what has queued up, at most `limit` items at a time, until a None arrives;
    with `linger`, wait that long after the first item for more to join it."""
    while True:
        first = work.get()
        if first is None:
            return
        batch = [first]
        deadline = time.monotonic() + linger
        while len(batch) < limit:
            try:
                wait = deadline - time.monotonic()
                item = work.get(timeout=wait) if wait > 0 else work.get_nowait()
            except queue.Empty:
                break
            if item is None:
                yield batch
                return
            batch.append(item)
        yield batch
