"""Injected failures, for tests of what a client does when Stripe fails: the next `count`
requests to a path answer an `api_error`, before or after their effect, or answer late."""

import threading
from dataclasses import dataclass
from typing import Literal

from insertcoin.server.payments.standin.errors import StripeError

When = Literal["before", "after"]


@dataclass
class Fault:
    method: str
    path: str  # the request's path, or a suffix of it ("/capture")
    status: int
    count: int
    when: When
    delay: float  # > 0: no error; the answer comes this many seconds after the effect

    def error(self) -> StripeError:
        return StripeError(
            self.status, "api_error", "An error occurred with our connection to Stripe. (injected)"
        )


class Faults:
    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._faults: list[Fault] = []

    def add(
        self,
        method: str,
        path: str,
        status: int = 500,
        count: int = 1,
        when: When = "before",
        delay: float = 0.0,
    ) -> None:
        if not 400 <= status <= 599 or count < 1 or delay < 0:
            raise ValueError("a fault needs a 4xx/5xx status, count >= 1 and delay >= 0")
        with self._lock:
            self._faults.append(Fault(method.upper(), path, status, count, when, delay))

    def clear(self, path: str) -> None:
        """Drop what is left of the faults injected on `path`."""
        with self._lock:
            self._faults = [fault for fault in self._faults if fault.path != path]

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault matching this request, counted as used."""
        with self._lock:
            for fault in self._faults:
                if fault.method == method and path.endswith(fault.path):
                    fault.count -= 1
                    if fault.count == 0:
                        self._faults.remove(fault)
                    return fault
            return None
