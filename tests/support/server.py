"""Running a real server for tests: in a thread (uvicorn on a free port) or as a child
process that can be SIGKILLed."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from insertcoin.server.app import create_app
from insertcoin.server.runtime import Runtime
from insertcoin.server.settings import Settings, load_settings
from tests.support.services import free_port, wait_port

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"

# Fast timings so delivery, retry and expiry happen within a test's patience.
# `serve --workers N` refuses simulated payments (the stand-in's state lives in one
# process): tests and benches that make no payment give it a Stripe account it never calls.
UNUSED_STRIPE = {
    "INSERTCOIN_STRIPE_API_KEY": "sk_test_unused",
    "INSERTCOIN_STRIPE_WEBHOOK_SECRET": "whsec_unused",
    "INSERTCOIN_STRIPE_API_BASE": "http://127.0.0.1:9",
    "INSERTCOIN_RECONCILE_INTERVAL_SECONDS": "3600",
}

FAST = {
    "INSERTCOIN_ADMIN_TOKEN": ADMIN_TOKEN,
    "INSERTCOIN_RETRY_INITIAL_SECONDS": "0.3",
    "INSERTCOIN_RETRY_MAX_SECONDS": "1",
    "INSERTCOIN_DISPATCH_INTERVAL_SECONDS": "0.1",
    "INSERTCOIN_CREDIT_GRACE_SECONDS": "0.5",
}


def make_settings(db_url: str, broker_url: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "mqtt_url": broker_url,
        "mqtt_topic_prefix": prefix,
        "admin_token": ADMIN_TOKEN,
        "retry_initial_seconds": 0.3,
        "retry_max_seconds": 1.0,
        "dispatch_interval_seconds": 0.1,
        "credit_grace_seconds": 0.5,
    }
    values.update(overrides)
    return load_settings(**values)


def add_cabinet(admin: httpx.Client, machine_id: str) -> dict[str, Any]:
    """Register a cabinet through the operator API; returns it with its credentials."""
    response = admin.post(
        "/api/cabinets",
        json={
            "machineId": machine_id,
            "name": f"Cabinet {machine_id}",
            "price": {"amount": 100, "currency": "usd"},
        },
    )
    assert response.status_code == 201, response.text
    cabinet: dict[str, Any] = response.json()
    return cabinet


class ServerThread:
    """The real app behind real HTTP, in this process (uvicorn in a thread)."""

    def __init__(self, settings: Settings, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if "public_url" not in settings.model_fields_set:
            # Pay links, and the simulated Stripe's webhooks, must reach this server.
            settings = settings.model_copy(update={"public_url": self.url})
        self.settings = settings
        self.runtime = Runtime(settings)
        self.runtime.start()
        config = uvicorn.Config(
            create_app(settings, self.runtime),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_port(self.port)
        self.admin = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        )

    def stop(self) -> None:
        self.admin.close()
        self._server.should_exit = True
        self._thread.join(10)
        self.runtime.stop()


class ServerProcess:
    """`insertcoin serve` as a child process, for crash and scale-out tests."""

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path,
        port: int | None = None,
        base_env: dict[str, str] = FAST,
        args: tuple[str, ...] = (),
        interpreter: tuple[str, ...] = (sys.executable,),
    ) -> None:
        self.port = port or free_port()
        self.args = args
        self.interpreter = interpreter
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **base_env, **env}
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"server-{self.port}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 20.0) -> float:
        """Start and wait for `/status` 200; returns the seconds that took."""
        started = time.monotonic()
        command = [*self.interpreter, "-m", "insertcoin", "serve", "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *self.args],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=log,
            )
        while True:
            try:
                if httpx.get(f"{self.url}/status", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() - started > timeout:
                self.stop()
                raise RuntimeError(
                    f"server did not start; see {self.log}:\n" + self.log.read_text()[-3000:]
                )
            time.sleep(0.01)

    def worker_pids(self) -> list[int]:
        """With `--workers N`, the live worker processes: the children, but
        multiprocessing's resource tracker and the dead not yet reaped."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        found = []
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # exited meanwhile
            if state != "Z" and b"resource_tracker" not in command:
                found.append(int(child))
        return found

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


def comp(server: ServerThread, machine_id: str, credits: int) -> str:
    """A comp grant through the operator API; its creditId."""
    response = server.admin.post(
        f"/api/cabinets/{machine_id}/credits", json={"credits": credits, "reason": "t"}
    )
    assert response.status_code == 201, response.text
    credit_id: str = response.json()["creditId"]
    return credit_id


def grant_state(server: ServerThread, credit_id: str) -> str:
    state: str = server.admin.get(f"/api/grants/{credit_id}").json()["state"]
    return state
