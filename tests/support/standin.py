"""The Stripe stand-in for tests: served by uvicorn in a thread, or as its own process (for
tests that SIGKILL the server while "Stripe" must live on), plus a webhook receiver that
records what Stripe would have sent."""

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import stripe
import uvicorn

from insertcoin.server.payments.standin import StandIn
from tests.support.http_server import LocalServer, QuietHandler
from tests.support.services import free_port, wait_port

WEBHOOK_SECRET = "whsec_test_0123456789abcdef"
API_KEY = "sk_test_standin"


def stripe_client(base_url: str, api_key: str = API_KEY, **options: Any) -> stripe.StripeClient:
    """The real SDK pointed at a stand-in; no SDK retries unless asked, so tests see each
    answer."""
    options.setdefault("max_network_retries", 0)
    return stripe.StripeClient(api_key, base_addresses={"api": base_url}, **options)


class StandInThread:
    """A `StandIn` behind real HTTP on a free port, in this process."""

    def __init__(self, webhook_url: str | None, **options: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        options.setdefault("webhook_secret", WEBHOOK_SECRET)
        self.standin = StandIn(public_url=self.url, webhook_url=webhook_url, **options)
        self.standin.start()
        config = uvicorn.Config(
            self.standin.app, host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_port(self.port)

    def client(self, api_key: str = API_KEY, **options: Any) -> stripe.StripeClient:
        return stripe_client(self.url, api_key, **options)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.standin.stop()


@contextmanager
def standin_thread(webhook_url: str | None, **options: Any) -> Iterator[StandInThread]:
    running = StandInThread(webhook_url, **options)
    try:
        yield running
    finally:
        running.stop()


@dataclass(frozen=True)
class Received:
    body: bytes
    headers: dict[str, str]

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.body)
        return event


class WebhookReceiver(LocalServer):
    """An HTTP endpoint that records every POST; answers the statuses in `answers` first
    (one per request), then 200."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.answers: list[int] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.received.append(Received(body, dict(self.headers.items())))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler)
        self.url += "/webhooks/stripe"

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [received.event for received in self.received]

    def types(self) -> list[str]:
        return [event["type"] for event in self.events()]

    def wait_for(
        self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Wait until `condition(events received so far)` holds; returns those events."""
        deadline = time.monotonic() + timeout
        while not condition(events := self.events()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"webhooks received: {[e['type'] for e in events]}")
            time.sleep(0.02)
        return events


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    try:
        yield receiver
    finally:
        receiver.stop()


class StandInProcess:
    """`python -m insertcoin.server.payments.standin` as a child process, with `/_control`."""

    def __init__(self, workdir: Path, webhook_url: str | None, *extra_args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"standin-{self.port}.log"
        command = [sys.executable, "-m", "insertcoin.server.payments.standin"]
        command += ["--port", str(self.port), "--webhook-secret", WEBHOOK_SECRET, "--control"]
        if webhook_url is not None:
            command += ["--webhook-url", webhook_url]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *extra_args], stdout=subprocess.PIPE, stderr=log
            )
        assert self.process.stdout is not None
        self.ready_line = self.process.stdout.readline().decode().strip()
        if "listening on" not in self.ready_line:
            self.stop()
            raise RuntimeError(f"stand-in did not start; see {self.log}")
        self.control = httpx.Client(base_url=f"{self.url}/_control", timeout=10)

    def client(self, api_key: str = API_KEY, **options: Any) -> stripe.StripeClient:
        return stripe_client(self.url, api_key, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def standin_process(
    workdir: Path, webhook_url: str | None, *extra_args: str
) -> Iterator[StandInProcess]:
    running = StandInProcess(workdir, webhook_url, *extra_args)
    try:
        yield running
    finally:
        running.control.close()
        running.stop()
