"""`gameover.source = "process"` with a real agent, server and Mosquitto: the agent runs
the game command per game, and the command's exit is the game over."""

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from insertcoin.agent.config import ConfigError, parse_config
from insertcoin.agent.outputs.simulated import SimulatedOutput
from insertcoin.agent.runner import Agent
from insertcoin.protocol import TopicKind, Topics
from tests.agent.test_agent import Watcher, wait_until
from tests.support.server import ServerThread, add_cabinet, comp, grant_state
from tests.support.services import Mosquitto, free_port

# A stand-in game: logs its environment, then plays until the test writes end-<n>.
GAME = """
import os, pathlib, sys, time
d = pathlib.Path(sys.argv[1])
with open(d / "games.log", "a") as log:
    log.write(f"{os.environ['INSERTCOIN_MACHINE_ID']} {os.environ['INSERTCOIN_CREDITS']}\\n")
(d / f"pid-{os.getpid()}").touch()
n = len((d / "games.log").read_text().splitlines())
while not (d / f"end-{n}").exists():
    time.sleep(0.02)
"""


def config_data(machine_id: str, tmp_path: Path, command: list[str]) -> dict[str, Any]:
    return {
        "machine_id": machine_id,
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "journal": {"path": str(tmp_path / "agent.db")},
        "coin": {"mode": "session", "output": "simulated"},
        "gameover": {"source": "process", "command": command},
        "screen": {"listen": f"127.0.0.1:{free_port()}"},
    }


def start_agent(
    server: ServerThread, broker: Mosquitto, topics: Topics, tmp_path: Path, command: list[str]
) -> tuple[Agent, str]:
    machine_id = f"cab-{uuid.uuid4().hex[:8]}"
    password = add_cabinet(server.admin, machine_id)["mqtt"]["password"]
    data = config_data(machine_id, tmp_path, command)
    data["mqtt"] = {
        "url": f"mqtt://{machine_id}:{password}@127.0.0.1:{broker.port}",
        "topic_prefix": topics.prefix,
    }
    agent = Agent(parse_config(data), output=SimulatedOutput())
    agent.start()
    assert agent.wait_online(10)
    return agent, machine_id


def game_command(tmp_path: Path) -> list[str]:
    return [sys.executable, "-c", GAME, str(tmp_path)]


def games_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "games.log"
    return path.read_text().splitlines() if path.exists() else []


def test_each_game_is_a_process_whose_exit_is_game_over(
    server: ServerThread, broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    """3 credits: the first game's process runs (INSERTCOIN_CREDITS=2 left) while the
    cabinet is playing; its exit publishes `gameover` with creditsLeft 1 (the credits
    held once the next game has taken one) and launches the next game; each exit does
    the same, and the last one returns the cabinet to attract with no game launched."""
    agent, machine_id = start_agent(server, broker, topics, tmp_path, game_command(tmp_path))
    watcher = Watcher(broker, [topics.topic(machine_id, TopicKind.GAMEOVER)])
    try:
        credit_id = comp(server, machine_id, 3)
        wait_until(lambda: grant_state(server, credit_id) == "applied")
        wait_until(lambda: games_log(tmp_path) == [f"{machine_id} 2"])
        assert (agent.snapshot()["state"], agent.snapshot()["credits"]) == ("playing", 2)
        assert watcher.find("gameover") == []

        (tmp_path / "end-1").touch()
        [over] = wait_until(lambda: watcher.find("gameover"))
        assert (over["status"], over["creditsLeft"]) == ("game_over", 1)
        wait_until(lambda: games_log(tmp_path)[1:] == [f"{machine_id} 1"])
        assert (agent.snapshot()["state"], agent.snapshot()["credits"]) == ("playing", 1)

        (tmp_path / "end-2").touch()
        wait_until(lambda: len(watcher.find("gameover")) == 2)
        assert watcher.find("gameover")[1]["creditsLeft"] == 0
        wait_until(lambda: games_log(tmp_path)[2:] == [f"{machine_id} 0"])
        assert (agent.snapshot()["state"], agent.snapshot()["credits"]) == ("playing", 0)

        (tmp_path / "end-3").touch()
        wait_until(lambda: len(watcher.find("gameover", creditsLeft=0)) == 2)
        wait_until(lambda: agent.snapshot()["state"] == "attract")
        time.sleep(0.3)  # time enough for a wrongly launched fourth game to show up
        assert len(games_log(tmp_path)) == 3
        assert agent.snapshot()["credits"] == 0
    finally:
        watcher.stop()
        agent.stop()


def test_a_game_command_that_cannot_start_ends_the_game(
    server: ServerThread, broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    """A game command that does not exist is logged and its game ended at once
    (`gameover` with creditsLeft 0, back to attract), and the agent keeps serving: a
    later grant is applied and ends the same way."""
    missing = str(tmp_path / "no-such-game")
    agent, machine_id = start_agent(server, broker, topics, tmp_path, [missing])
    watcher = Watcher(broker, [topics.topic(machine_id, TopicKind.GAMEOVER)])
    try:
        for round_ in (1, 2):
            credit_id = comp(server, machine_id, 1)
            wait_until(lambda c=credit_id: grant_state(server, c) == "applied")
            wait_until(lambda n=round_: len(watcher.find("gameover", creditsLeft=0)) == n)
            wait_until(lambda: agent.snapshot()["state"] == "attract")
            assert agent.snapshot()["online"] is True
    finally:
        watcher.stop()
        agent.stop()


def test_stopping_the_agent_terminates_a_running_game(
    server: ServerThread, broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    """A game still running when the agent stops is terminated (promptly, no game over
    published for it): the process is gone once `stop()` returns."""
    agent, machine_id = start_agent(server, broker, topics, tmp_path, game_command(tmp_path))
    watcher = Watcher(broker, [topics.topic(machine_id, TopicKind.GAMEOVER)])
    try:
        comp(server, machine_id, 1)
        [pid_file] = wait_until(lambda: list(tmp_path.glob("pid-*")))
        pid = int(pid_file.name.removeprefix("pid-"))
        started = time.monotonic()
        agent.stop()
        assert time.monotonic() - started < 5
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        time.sleep(0.3)
        assert watcher.find("gameover") == []
    finally:
        watcher.stop()


def test_process_source_needs_a_command_and_session_mode(tmp_path: Path) -> None:
    """`gameover.command` is required with source "process", and "process" is refused in
    pulse mode, each with one line naming the key."""
    data = config_data("cab-1", tmp_path, ["game"])
    del data["gameover"]["command"]
    with pytest.raises(ConfigError, match=r"^gameover\.command: required when gameover\.source"):
        parse_config(data)
    data = config_data("cab-1", tmp_path, ["game"])
    data["coin"]["mode"] = "pulse"
    with pytest.raises(ConfigError, match=r'^gameover\.source: "process" needs coin\.mode'):
        parse_config(data)
