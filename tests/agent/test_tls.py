"""The agent over TLS (`mqtts://` with `mqtt.ca_file`), against a real Mosquitto with a
TLS listener whose certificate is signed by a CA made for the test: it connects and
announces itself when it trusts that CA, and never connects when it trusts another."""

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from insertcoin.agent.config import parse_config
from insertcoin.agent.outputs.simulated import SimulatedOutput
from insertcoin.agent.runner import Agent
from insertcoin.protocol import Topics
from tests.agent.test_agent import Watcher, wait_until
from tests.support.services import Mosquitto, free_port, mosquitto, wait_port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> Path:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.crt"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mosquitto, int, Path]]:
    """Mosquitto with a plain listener (for the watcher) and a TLS one on 127.0.0.1."""
    certs = tmp_path_factory.mktemp("certs")
    ca = _ca(certs, "test-ca")
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "broker.key", "-out", "broker.csr", cwd=certs,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", ca.name, "-CAkey", "test-ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "broker.crt",
        cwd=certs,
    )  # fmt: skip
    tls_port = free_port()
    extra = (
        "allow_anonymous true\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {ca}\ncertfile {certs / 'broker.crt'}\nkeyfile {certs / 'broker.key'}\n"
    )
    workdir = tmp_path_factory.mktemp("tls-broker")
    with mosquitto(workdir, extra) as broker:
        wait_port(tls_port)
        yield broker, tls_port, certs


def _agent(tls_port: int, ca_file: Path, tmp_path: Path, topics: Topics) -> tuple[Agent, str]:
    machine_id = f"tls-{uuid.uuid4().hex[:8]}"
    config = parse_config(
        {
            "machine_id": machine_id,
            "mqtt": {
                "url": f"mqtts://127.0.0.1:{tls_port}",
                "ca_file": str(ca_file),
                "topic_prefix": topics.prefix,
            },
            "journal": {"path": str(tmp_path / "agent.db")},
            "coin": {"output": "simulated"},
            "gameover": {"source": "none"},
            "screen": {"listen": f"127.0.0.1:{free_port()}"},
        }
    )
    agent = Agent(config, output=SimulatedOutput())
    agent.start()
    return agent, machine_id


def test_agent_connects_over_tls_with_its_ca_file(
    tls_broker: tuple[Mosquitto, int, Path], tmp_path: Path
) -> None:
    """Trusting the CA that signed the broker's certificate, the agent connects over TLS
    and its retained status says online."""
    broker, tls_port, certs = tls_broker
    topics = Topics(f"t/{uuid.uuid4().hex[:8]}")
    watcher = Watcher(broker, [f"{topics.prefix}/+/status"])
    agent, machine_id = _agent(tls_port, certs / "test-ca.crt", tmp_path, topics)
    try:
        assert agent.wait_online(10)
        wait_until(lambda: watcher.find("status", machineId=machine_id, online=True))
    finally:
        agent.stop()
        watcher.stop()


def test_agent_refuses_a_broker_its_ca_did_not_sign(
    tls_broker: tuple[Mosquitto, int, Path], tmp_path: Path
) -> None:
    """Trusting another CA, the agent never completes the TLS handshake: no connection,
    no status."""
    broker, tls_port, _ = tls_broker
    other = _ca(tmp_path, "other-ca")
    topics = Topics(f"t/{uuid.uuid4().hex[:8]}")
    watcher = Watcher(broker, [f"{topics.prefix}/+/status"])
    agent, machine_id = _agent(tls_port, other, tmp_path, topics)
    try:
        assert not agent.wait_online(3)
        assert watcher.find("status", machineId=machine_id) == []
    finally:
        agent.stop()
        watcher.stop()
