"""The load generator: aiohttp on uvloop, N workers in one process, every call timed on
the wall clock (`time.time()`, so other processes' timestamps compare with it)."""

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    start: float  # Unix time just before the request was written
    end: float  # Unix time once the whole response was read
    status: int  # 0: the request failed (connection error, timeout)
    credit_id: str | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when available (it is: uvicorn[standard] brings it)."""
    try:
        import uvloop  # noqa: PLC0415

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def drive(
    method: str,
    url_of: Callable[[int], str],
    *,
    concurrency: int,
    seconds: float | None = None,
    count: int | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    credit_ids: bool = False,
    request_of: Callable[[int], tuple[bytes, dict[str, str]]] | None = None,
) -> list[Call]:
    """`count` calls, or as many as fit in `seconds`, from `concurrency` workers sharing
    one keep-alive connection pool. `url_of(i)` gives the i-th call's URL; `request_of(i)`,
    if given, its body and extra headers."""
    assert seconds is not None or count is not None
    calls: list[Call] = []
    numbers = itertools.count()
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers or {}
    ) as session:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds if seconds is not None else None

        async def worker() -> None:
            while True:
                i = next(numbers)
                if count is not None and i >= count:
                    return
                if deadline is not None and loop.time() >= deadline:
                    return
                data, extra = request_of(i) if request_of is not None else (body, None)
                start = time.time()
                try:
                    async with session.request(
                        method, url_of(i), data=data, headers=extra
                    ) as response:
                        payload = await response.read()
                        status = response.status
                except (TimeoutError, aiohttp.ClientError):
                    payload, status = b"", 0
                end = time.time()
                credit_id = None
                if credit_ids and status == 201:
                    credit_id = orjson.loads(payload)["creditId"]
                calls.append(Call(start, end, status, credit_id))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls


def rate(calls: list[Call], ok: int = 200) -> dict[str, Any]:
    """Throughput of a timed burst: successful calls per second of its span."""
    if not calls:
        return {"calls": 0}
    span = max(c.end for c in calls) - min(c.start for c in calls)
    good = sum(1 for c in calls if c.status == ok)
    return {
        "calls": len(calls),
        "ok": good,
        "errors": len(calls) - good,
        "seconds": round(span, 3),
        "per_second": round(good / span, 1) if span > 0 else None,
    }
