"""Signed webhook delivery as Stripe does it: each event POSTed as JSON with a
`Stripe-Signature` header, any non-2xx answer or network error retried after the next
delay, re-signed with a fresh timestamp on every attempt."""

import hashlib
import hmac
import http.client
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from insertcoin.server.payments.standin.objects import Event, Json

TIMEOUT_SECONDS = 5.0


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


@dataclass(frozen=True)
class _Attempt:
    event: Event
    number: int
    due: float  # time.monotonic()


class Webhooks:
    def __init__(
        self,
        url: str | None,
        secret: str,
        retry_delays: Sequence[float],
        lock: threading.RLock,
        wake: threading.Event,
    ) -> None:
        self._url = url
        self._secret = secret
        self._retry_delays = tuple(retry_delays)
        self._lock = lock
        self._queue: list[_Attempt] = []
        self._log: list[Json] = []
        self._paused = False
        self._drop = 0
        self._wake = wake  # the background thread's: something may be due now

    def publish(self, event: Event) -> None:
        """Queue a new event (called inside the account's lock)."""
        if self._url is None:
            return
        if self._drop:
            self._drop -= 1
            return
        event.pending_webhooks = 1
        self._queue.append(_Attempt(event, 1, time.monotonic()))
        self._wake.set()

    def resend(self, event: Event) -> None:
        """A dashboard "resend": one more delivery now, whatever happened before."""
        with self._lock:
            if self._url is not None:
                self._queue.append(_Attempt(event, 1, time.monotonic()))
        self._wake.set()

    def pause(self, paused: bool) -> None:
        with self._lock:
            self._paused = paused
        self._wake.set()

    def drop_next(self, count: int) -> None:
        with self._lock:
            self._drop = count

    def deliveries(self) -> list[Json]:
        with self._lock:
            return [dict(entry) for entry in self._log]

    def deliver_due(self) -> None:
        """Make every attempt that is due, oldest event first (called by the background
        thread; the lock is not held while a request is in flight)."""
        with self._lock:
            if self._paused or self._url is None:
                return
            now = time.monotonic()
            due = sorted(
                (attempt for attempt in self._queue if attempt.due <= now),
                key=lambda attempt: (attempt.event.seq, attempt.number),
            )
            self._queue = [attempt for attempt in self._queue if attempt.due > now]
        for attempt in due:
            with self._lock:
                body = json.dumps(attempt.event.to_json(), indent=2).encode()
            status = self._post(self._url, body)
            with self._lock:
                self._log.append(
                    {
                        "event": attempt.event.id,
                        "type": attempt.event.type,
                        "attempt": attempt.number,
                        "status": status,
                    }
                )
                if isinstance(status, int) and 200 <= status < 300:
                    attempt.event.pending_webhooks = 0
                elif attempt.number <= len(self._retry_delays):
                    delay = self._retry_delays[attempt.number - 1]
                    retry = _Attempt(attempt.event, attempt.number + 1, time.monotonic() + delay)
                    self._queue.append(retry)

    def _post(self, url: str, body: bytes) -> int | str:
        """The receiver's HTTP status, or the name of the network error."""
        parts = urlsplit(url)
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_class(parts.netloc, timeout=TIMEOUT_SECONDS)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": sign(body, self._secret, int(time.time())),
        }
        try:
            target = parts.path or "/"
            connection.request(
                "POST", f"{target}?{parts.query}" if parts.query else target, body, headers
            )
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException) as exc:
            return type(exc).__name__
        finally:
            connection.close()
