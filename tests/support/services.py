"""Real services for tests: PostgreSQL schemas, Mosquitto processes, the embedded broker.

Tests use PostgreSQL and Mosquitto when they answer and skip those variants when they
don't — unless INSERTCOIN_TEST_REQUIRE_SERVICES=1 (set by CI), which turns a missing
service into a failure.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from insertcoin.server.delivery.embedded_broker import EmbeddedBroker, is_listening

PG_URL = os.environ.get("INSERTCOIN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE = os.environ.get("INSERTCOIN_TEST_REQUIRE_SERVICES") == "1"


def missing(what: str) -> None:
    if REQUIRE:
        pytest.fail(f"{what} is required (INSERTCOIN_TEST_REQUIRE_SERVICES=1) but unavailable")
    pytest.skip(f"{what} is not available here")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_listening("127.0.0.1", port, timeout=0.2):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.02)


def postgres_available() -> bool:
    try:
        with psycopg.connect(PG_URL, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema for one test; yields a database URL that uses only it."""
    if not postgres_available():
        missing("PostgreSQL")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


class Mosquitto:
    """A Mosquitto broker of our own on a free port, killable and restartable."""

    def __init__(self, workdir: Path, extra_config: str = "", port: int | None = None) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir = workdir
        self.port = port or free_port()
        self.data = workdir / "data"
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        # Started as root, Mosquitto would switch to its own user, who cannot enter
        # pytest's private temporary directories: persistence would silently fail.
        conf.write_text(
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            f"listener {self.port} 127.0.0.1\n"
            f"persistence true\npersistence_location {self.data}/\n"
            "autosave_interval 1\nmax_queued_messages 100000\nmax_inflight_messages 0\n"
            "set_tcp_nodelay true\n" + (self.extra_config or "allow_anonymous true\n")
        )
        log = (self.workdir / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log)
        wait_port(self.port)

    def kill(self, *, wipe: bool = False) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None
        if wipe:
            shutil.rmtree(self.data, ignore_errors=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


@contextmanager
def mosquitto(workdir: Path, extra_config: str = "") -> Iterator[Mosquitto]:
    if not Path(shutil.which("mosquitto") or "/usr/sbin/mosquitto").exists():
        missing("Mosquitto")
    broker = Mosquitto(workdir, extra_config)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def embedded_broker() -> Iterator[str]:
    port = free_port()
    broker = EmbeddedBroker("127.0.0.1", port)
    broker.start()
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        broker.stop()
