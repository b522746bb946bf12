"""Draining a work queue in batches, for the threads that write to the database: one
transaction (one commit, one fsync) for whatever queued up while the last one ran."""

import queue
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def batches(work: "queue.Queue[T | None]", limit: int) -> Iterator[list[T]]:
    """Yield what has queued up, at most `limit` items at a time, until a None arrives."""
    while True:
        first = work.get()
        if first is None:
            return
        batch = [first]
        while len(batch) < limit:
            try:
                item = work.get_nowait()
            except queue.Empty:
                break
            if item is None:
                yield batch
                return
            batch.append(item)
        yield batch
