"""Idempotent requests as Stripe keeps them: the first answer to a key (including a 5xx) is
stored for 24 hours and replayed for the same parameters; other parameters under the same
key are refused; a request that failed validation stores nothing."""

import threading
import time
from dataclasses import dataclass
from typing import Any

from insertcoin.server.payments.standin.errors import StripeError

TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Stored:
    status: int
    body: dict[str, Any]
    request_id: str


@dataclass
class _Entry:
    fingerprint: object  # (method, path, decoded parameters)
    created: float
    result: Stored | None = None  # None while the first request is still running


class IdempotencyKeys:
    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._entries: dict[str, _Entry] = {}  # insertion order is age order

    def begin(self, key: str, fingerprint: object) -> Stored | None:
        """The stored answer to replay, or None: this request runs and must `finish` or
        `abandon` the key. Raises Stripe's `idempotency_error` for a misuse of the key."""
        with self._lock:
            now = time.monotonic()
            while self._entries:
                oldest = next(iter(self._entries))
                if now - self._entries[oldest].created < TTL_SECONDS:
                    break
                del self._entries[oldest]
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(fingerprint, now)
                return None
            if entry.fingerprint != fingerprint:
                raise StripeError(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters "
                    f"they were first used with. Try using a key other than '{key}' if you "
                    "meant to execute a different request.",
                )
            if entry.result is None:
                raise StripeError(
                    409,
                    "idempotency_error",
                    "There is currently another in-progress request using this Stripe "
                    "Idempotency Key (that probably means you submitted twice, and the other "
                    "request is still going through): " + key + ". Please try again later.",
                )
            return entry.result

    def finish(self, key: str, result: Stored) -> None:
        with self._lock:
            self._entries[key].result = result

    def abandon(self, key: str) -> None:
        with self._lock:
            del self._entries[key]
