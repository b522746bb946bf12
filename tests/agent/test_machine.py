"""The machine's decisions without a broker: acks, out of service, resuming after a crash,
and the command output's environment."""

import sys
from pathlib import Path

import msgspec
import pytest

from insertcoin.agent.config import CoinConfig
from insertcoin.agent.journal import Journal
from insertcoin.agent.machine import Machine
from insertcoin.agent.outputs.command import CommandOutput
from insertcoin.agent.outputs.simulated import SimulatedOutput
from insertcoin.protocol import Ack, Message
from tests.support.messages import coinpulse


def make(tmp_path: Path, sink: object, **coin: object) -> tuple[Machine, list[Message]]:
    sent: list[Message] = []
    machine = Machine(
        "cab1",
        msgspec.convert({"output": "simulated", **coin}, CoinConfig),
        Journal(tmp_path / "agent.db"),
        sink,  # type: ignore[arg-type]
        send=lambda _kind, message: sent.append(message),
        on_change=lambda: None,
    )
    return machine, sent


def test_failing_command_puts_the_cabinet_out_of_service(tmp_path: Path) -> None:
    """A coin command that fails is not retried; the cabinet reports out_of_service and
    rejects the next grant with a reason instead of taking money for nothing."""
    output = CommandOutput([sys.executable, "-c", "raise SystemExit(3)"], "cab1", gap_ms=1)
    machine, sent = make(tmp_path, output, output="command", command=["x"])
    machine.handle_coinpulse(coinpulse("cab1", "cr_1"))
    machine.handle_coinpulse(coinpulse("cab1", "cr_2"))
    acks = [m for m in sent if isinstance(m, Ack)]
    assert [(a.credit_id, a.result) for a in acks] == [("cr_1", "applied"), ("cr_2", "rejected")]
    assert acks[1].reason == "out of service: coin command exited with 3"
    assert machine.state == "out_of_service"


def test_command_gets_machine_credit_and_pulse_index(tmp_path: Path) -> None:
    """The command runs once per pulse with the three INSERTCOIN_* variables set."""
    log = tmp_path / "pulses.txt"
    script = (
        "import os;"
        f"open({str(log)!r}, 'a').write(' '.join(os.environ[k] for k in "
        "('INSERTCOIN_MACHINE_ID', 'INSERTCOIN_CREDIT_ID', 'INSERTCOIN_PULSE_INDEX')) + '\\n')"
    )
    CommandOutput([sys.executable, "-c", script], "cab1", gap_ms=1).pulse("cr_9", 2)
    assert log.read_text().splitlines() == ["cab1 cr_9 0", "cab1 cr_9 1"]


def test_pulse_mode_resumes_journaled_credits_after_a_crash(tmp_path: Path) -> None:
    """Credits journaled but not yet pulsed when the agent died go out at the next start."""
    Journal(tmp_path / "agent.db").record("cr_1", 2)
    output = SimulatedOutput()
    machine, _ = make(tmp_path, output, pulses_per_credit=3)
    machine.start()
    machine.stop()
    assert output.total == 6
    assert machine.credits == 0


def test_session_game_over_without_a_game_is_refused(tmp_path: Path) -> None:
    """In session mode a game over while in attract raises and publishes nothing."""
    machine, sent = make(tmp_path, SimulatedOutput(), mode="session")
    with pytest.raises(ValueError, match="no game is running"):
        machine.game_over()
    assert sent == []


def test_grants_for_another_machine_or_malformed_are_not_acked(tmp_path: Path) -> None:
    """A coinpulse naming another machine, or not valid JSON, is dropped without an ack."""
    output = SimulatedOutput()
    machine, sent = make(tmp_path, output)
    machine.handle_coinpulse(coinpulse("cab2", "cr_x"))
    machine.handle_coinpulse(b"{not json")
    assert sent == []
    assert output.total == 0
