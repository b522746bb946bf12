"""Token buckets per key (client address, cabinet), in process memory: enough to stop a
flood of scans from opening a flood of Checkout Sessions. Each server process keeps its
own buckets, so N processes allow up to N times the rate."""

import threading
import time

# Forget keys whose bucket has refilled, once there are this many (bounded memory).
_MAX_KEYS = 10_000


class RateLimiter:
    def __init__(self, per_minute: float, burst: float | None = None) -> None:
        self._rate = per_minute / 60.0
        self._burst = burst if burst is not None else max(per_minute / 6.0, 3.0)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take one token from `key`'s bucket; False when it is empty."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > _MAX_KEYS:
                self._forget_full(now)
            return allowed

    def _forget_full(self, now: float) -> None:
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self._rate >= self._burst:
                del self._buckets[key]
