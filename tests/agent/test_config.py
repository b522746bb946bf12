"""The cabinet's TOML file: every bad or unknown key stops start-up with one line naming it."""

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from insertcoin.agent.config import ConfigError, load_config, parse_config

GOOD: dict[str, Any] = {
    "machine_id": "arcade123",
    "mqtt": {"url": "mqtt://arcade123:secret@127.0.0.1:1883"},
    "journal": {"path": "agent.db"},
    "coin": {"mode": "pulse", "output": "simulated"},
}

SAMPLE = """\
machine_id = "arcade123"

[mqtt]
url = "mqtts://arcade123:PASSWORD@broker.example.com:8883"

[journal]
path = "/var/lib/insertcoin/agent.db"

[coin]
mode = "pulse"
output = "gpio"
pulses_per_credit = 1
pulse_ms = 100
gap_ms = 150
pin = 17
active_high = true
key = "KEY_5"
command = ["/usr/local/bin/add-coin"]

[gameover]
source = "http"

[screen]
listen = "127.0.0.1:8765"
"""


def _with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD)
    *parents, key = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    return data


def test_protocol_sample_loads(tmp_path: Path) -> None:
    """The section 7 sample, every key present, is accepted as written."""
    path = tmp_path / "cabinet.toml"
    path.write_text(SAMPLE)
    config = load_config(path)
    assert config.coin.pin == 17
    assert config.mqtt.target.tls
    assert config.mqtt.target.port == 8883


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bogus", 1, "bogus: unknown key"),
        ("coin.bogus", 1, "coin.bogus: unknown key"),
        ("mqtt.user", "x", "mqtt.user: unknown key"),
        ("coin.mode", "credits", 'coin.mode: must be "pulse" or "session"'),
        ("coin.output", "lamp", 'coin.output: must be "command", "gpio", "keyboard" or'),
        ("coin.pulses_per_credit", 0, "coin.pulses_per_credit: expected int >= 1"),
        ("coin.pulse_ms", "100", "coin.pulse_ms: expected int, got str"),
        ("coin.gap_ms", 10_001, "coin.gap_ms: expected int <= 10000"),
        ("coin.active_high", "yes", "coin.active_high: expected bool, got str"),
        ("coin.pin", 99, "coin.pin: expected int <= 27"),
        ("coin.key", "5", "coin.key: expected str matching regex"),
        ("coin.command", [], "coin.command: expected array of length >= 1"),
        ("gameover.source", "button", 'gameover.source: must be "gpio", "http", "none" or'),
        ("machine_id", "a/b", "machine_id: use 1-64 characters"),
        ("mqtt.url", "http://broker", "mqtt.url: must start with mqtt:// or mqtts://"),
        ("mqtt.url", "mqtt://h:99999", "mqtt.url: has a bad port"),
        ("mqtt.ca_file", "/nonexistent.crt", "mqtt.ca_file: only used with an mqtts:// url"),
        ("mqtt.topic_prefix", "a/#", "mqtt.topic_prefix: invalid topic prefix"),
        ("screen.listen", "8765", 'screen.listen: must be "host:port"'),
        ("screen.bogus", 1, "screen.bogus: unknown key"),
        ("journal.path", 5, "journal.path: expected str, got int"),
    ],
)
def test_bad_key_names_the_key(key: str, value: Any, message: str) -> None:
    """Each bad value or unknown key gives one line that starts with the key's name."""
    with pytest.raises(ConfigError) as caught:
        parse_config(_with(key, value))
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(message), text


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("machine_id", "machine_id: required"),
        ("mqtt", "mqtt: required"),
        ("coin", "coin: required"),
    ],
)
def test_missing_key_is_named(drop: str, message: str) -> None:
    """A missing required key is named."""
    data = copy.deepcopy(GOOD)
    del data[drop]
    with pytest.raises(ConfigError, match=f"^{message}$"):
        parse_config(data)


def test_output_needs_its_settings(tmp_path: Path) -> None:
    """gpio needs a pin, command a command, a gpio game over its pin; a ca_file must exist."""
    with pytest.raises(ConfigError, match=r"^coin\.pin: required"):
        parse_config(_with("coin.output", "gpio"))
    with pytest.raises(ConfigError, match=r"^coin\.command: required"):
        parse_config(_with("coin.output", "command"))
    with pytest.raises(ConfigError, match=r"^gameover\.pin: required"):
        parse_config(_with("gameover.source", "gpio"))
    data = _with("mqtt.url", "mqtts://h")
    data["mqtt"]["ca_file"] = str(tmp_path / "missing.crt")
    with pytest.raises(ConfigError, match=r"^mqtt\.ca_file: no such file"):
        parse_config(data)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """`insertcoin agent --config bad.toml` prints one line, no traceback, exit code 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text(SAMPLE.replace('mode = "pulse"', 'mode = "coins"'))
    done = subprocess.run(
        [sys.executable, "-m", "insertcoin", "agent", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == ['config error: coin.mode: must be "pulse" or "session"'], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_cli_unreadable_file_is_one_line(tmp_path: Path) -> None:
    """A missing or non-TOML file is one line too."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("machine_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(broken)
    assert "\n" not in str(caught.value)
