"""`insertcoin demo`: the whole system on one laptop, no configuration.

A server (SQLite in a temporary directory, an embedded MQTT broker, simulated Stripe)
and three simulated cabinets: real agents in `session` mode with recording outputs,
whose games are a stand-in process that lasts a few seconds. `--smoke` makes one
purchase by itself and exits.
"""

import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from insertcoin.agent.config import parse_config
from insertcoin.agent.runner import Agent
from insertcoin.server.cabinets.models import CabinetCreate
from insertcoin.server.delivery.embedded_broker import EmbeddedBroker
from insertcoin.server.runtime import Runtime
from insertcoin.server.settings import load_settings

log = structlog.get_logger(__name__)

CABINETS = (
    ("galaga", "Galaga", "1.00"),
    ("pacman", "Pac-Man", "0.50"),
    ("tetris", "Tetris", "2.00"),
)
GAME_SECONDS = 5.0
SCREEN_PORT = 8765


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _port_or_free(port: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


@dataclass
class DemoCabinet:
    machine_id: str
    name: str
    agent: Agent
    screen_url: str
    pay_url: str


class Demo:
    def __init__(self, workdir: Path, port: int, game_seconds: float = GAME_SECONDS) -> None:
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        broker_port = free_port()
        self.broker = EmbeddedBroker("127.0.0.1", broker_port)
        self.settings = load_settings(
            database_url=f"sqlite:///{workdir / 'insertcoin.db'}",
            mqtt_url=f"mqtt://127.0.0.1:{broker_port}",
            mqtt_shared_subscriptions=False,  # the embedded broker has no $share
            public_url=self.url,
            stripe_api_key=None,  # the demo never touches real money
            stripe_webhook_secret=None,
            stripe_api_base=None,
        )
        self.runtime = Runtime(self.settings)
        self.cabinets: list[DemoCabinet] = []
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._game_seconds = game_seconds

    def start(self) -> None:
        import uvicorn  # noqa: PLC0415

        from insertcoin.server.app import create_app  # noqa: PLC0415

        self.broker.start()
        self.runtime.start()
        config = uvicorn.Config(
            create_app(self.settings, self.runtime),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self._thread.start()
        _wait(lambda: self._server.started, 20, "the HTTP server did not start")
        for index, (machine_id, name, price) in enumerate(CABINETS):
            self._add_cabinet(index, machine_id, name, price)

    def _add_cabinet(self, index: int, machine_id: str, name: str, price: str) -> None:
        cents = int(Decimal(price) * 100)
        created = self.runtime.registry.create(
            CabinetCreate.model_validate(
                {
                    "machineId": machine_id,
                    "name": name,
                    "price": {"amount": cents, "currency": "usd"},
                }
            )
        )
        self.runtime.dispatcher.wake()  # publish its retained config now
        listen_port = _port_or_free(SCREEN_PORT + index)
        config = parse_config(
            {
                "machine_id": machine_id,
                "mqtt": {
                    "url": f"mqtt://{created.mqtt.username}:{created.mqtt.password}"
                    f"@127.0.0.1:{self.broker.port}"
                },
                "journal": {"path": str(self.workdir / f"{machine_id}.journal.db")},
                "coin": {"mode": "session", "output": "simulated"},
                # The player: a stand-in game process that plays for a few seconds.
                "gameover": {
                    "source": "process",
                    "command": [
                        sys.executable,
                        "-c",
                        f"import time; time.sleep({self._game_seconds})",
                    ],
                },
                "screen": {"listen": f"127.0.0.1:{listen_port}"},
            }
        )
        agent = Agent(config)
        agent.start()
        self.cabinets.append(
            DemoCabinet(
                machine_id,
                name,
                agent,
                f"http://127.0.0.1:{listen_port}/",
                self.settings.pay_url(machine_id),
            )
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Every cabinet online (the server saw its status) and configured."""
        for cabinet in self.cabinets:
            _wait(
                lambda c=cabinet: (
                    self.runtime.registry.get(c.machine_id).online  # type: ignore[misc]
                    and c.agent.snapshot()["payUrl"] is not None
                ),
                timeout,
                f"cabinet {cabinet.machine_id} did not come online",
            )

    def banner(self) -> str:
        admin = self.runtime.admin
        lines = [
            f"insertcoin demo on {self.url}  (payments: simulated — test card 4242 4242 4242 4242)",
            f"  operator API docs: {self.url}/docs"
            + (f"   admin token: {admin.new_token}" if admin and admin.new_token else ""),
        ]
        for cabinet in self.cabinets:
            lines.append(
                f"  {cabinet.name:8s} attract screen {cabinet.screen_url:28s} pay {cabinet.pay_url}"
            )
        lines.append("Open an attract screen, then its pay link (or scan its QR). Ctrl-C stops.")
        return "\n".join(lines)

    def smoke(self, timeout: float = 30.0) -> str:
        """One purchase by itself: scan, pay on the stand-in, watch it arrive and play."""
        cabinet = self.cabinets[0]
        started = time.monotonic()
        session_id = _checkout_session(cabinet.pay_url)
        standin = self.runtime.payments.standin
        assert standin is not None
        standin.pay(session_id)
        _wait(
            lambda: cabinet.agent.snapshot()["state"] == "playing",
            timeout,
            f"the credit never reached {cabinet.name}",
        )
        delivered = time.monotonic() - started
        _wait(lambda: self._purchase_state(session_id) == "credited", timeout, "never captured")
        credited = time.monotonic() - started
        return (
            f"smoke: paid on {cabinet.name}; credit on the cabinet after {delivered:.2f} s, "
            f"game started, purchase credited after {credited:.2f} s"
        )

    def _purchase_state(self, session_id: str) -> str | None:
        from insertcoin.server.payments import purchases  # noqa: PLC0415

        with self.runtime.db.read() as conn:
            found = purchases.of_session(conn, self.cabinets[0].machine_id, session_id)
        return None if found is None else str(found["state"])

    def stop(self) -> None:
        for cabinet in self.cabinets:
            cabinet.agent.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.runtime.stop()
        self.broker.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _checkout_session(pay_url: str) -> str:
    """Scan the QR code: `/pay/{id}` answers 303 to the checkout page of a new session."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(pay_url, timeout=10)
    except urllib.error.HTTPError as answer:
        if answer.code == 303:
            return urlsplit(answer.headers["Location"]).path.rsplit("/", 1)[-1]
        raise RuntimeError(f"{pay_url} answered {answer.code}") from None
    raise RuntimeError(f"{pay_url} opened no checkout")


def _wait(ready: Callable[[], object], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(failure)
        time.sleep(0.05)


def run(port: int, *, smoke: bool) -> str | None:
    """Run the demo until Ctrl-C, or (smoke) one purchase; returns the smoke summary."""
    with tempfile.TemporaryDirectory(prefix="insertcoin-demo-") as tmp:
        demo = Demo(Path(tmp), _port_or_free(port), game_seconds=1.0 if smoke else GAME_SECONDS)
        try:
            demo.start()
            demo.wait_ready()
            if smoke:
                return demo.smoke()
            print(demo.banner(), flush=True)
            threading.Event().wait()
        except KeyboardInterrupt:
            return None
        finally:
            demo.stop()
    return None
