"""`output = "keyboard"`: coin key presses on a uinput virtual keyboard, and the one-line
errors an operator sees when the key, evdev or /dev/uinput is not right."""

import os
import select
import sys
from pathlib import Path
from typing import Any

import pytest

from insertcoin.agent.config import ConfigError, parse_config
from insertcoin.agent.outputs.keyboard import KeyboardOutput
from insertcoin.agent.runner import build_output

UINPUT = Path("/dev/uinput")
uinput_usable = UINPUT.exists() and os.access(UINPUT, os.W_OK)


def test_unknown_key_names_coin_key(tmp_path: Path) -> None:
    """A key name evdev does not know stops start-up with `coin.key: unknown key`."""
    with pytest.raises(ConfigError, match=r'^coin\.key: unknown key "KEY_NOPE"$'):
        KeyboardOutput("KEY_NOPE", 100, 150, devnode=str(tmp_path / "uinput"))


def test_missing_uinput_says_how_to_fix(tmp_path: Path) -> None:
    """Without a uinput device the error names the device and the fix (modprobe, access)."""
    devnode = tmp_path / "uinput"
    with pytest.raises(ConfigError) as raised:
        KeyboardOutput("KEY_5", 100, 150, devnode=str(devnode))
    message = str(raised.value)
    assert message.startswith(f"coin.output: cannot open {devnode} (")
    assert message.endswith("sudo modprobe uinput, and give the agent's user access")
    assert "\n" not in message


def test_missing_evdev_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without evdev installed, the error names the extra to install."""
    monkeypatch.setitem(sys.modules, "evdev", None)
    with pytest.raises(ConfigError, match=r'pip install "insertcoin\[keyboard\]"'):
        KeyboardOutput("KEY_5", 100, 150)


def test_runner_builds_the_keyboard_output(tmp_path: Path) -> None:
    """`coin.output = "keyboard"` is wired: the runner opens /dev/uinput for it (and on a
    machine without uinput stops with the uinput hint, not "not available")."""
    config = parse_config(
        {
            "machine_id": "cab-1",
            "mqtt": {"url": "mqtt://127.0.0.1:1883"},
            "journal": {"path": str(tmp_path / "agent.db")},
            "coin": {"output": "keyboard", "key": "KEY_6"},
        }
    )
    if uinput_usable:
        output = build_output(config)
        try:
            assert isinstance(output, KeyboardOutput)
        finally:
            output.close()
    else:
        with pytest.raises(ConfigError, match=r"^coin\.output: cannot open /dev/uinput .*modprobe"):
            build_output(config)


def read_key_events(device: Any, code: int, wanted: int) -> list[tuple[int, float]]:
    """(value, timestamp) of the next `wanted` events of key `code` on `device`."""
    events: list[tuple[int, float]] = []
    while len(events) < wanted:
        ready, _, _ = select.select([device.fd], [], [], 5)
        assert ready, "no key event within 5 s"
        for event in device.read():
            if event.type == 1 and event.code == code:  # EV_KEY
                events.append((event.value, event.timestamp()))
    return events


@pytest.mark.skipif(not uinput_usable, reason="needs a writable /dev/uinput (modprobe uinput)")
def test_presses_have_the_configured_width_and_gap() -> None:
    """Read back from the created device: 2 pulses are press/release pairs held for
    pulse_ms, with at least gap_ms released between them."""
    import evdev  # noqa: PLC0415

    output = KeyboardOutput("KEY_5", 60, 90)
    try:
        assert output.device_path is not None
        device = evdev.InputDevice(output.device_path)
        try:
            output.pulse("credit-1", 2)
            events = read_key_events(device, evdev.ecodes.KEY_5, 4)
        finally:
            device.close()
    finally:
        output.close()
    assert [value for value, _ in events] == [1, 0, 1, 0]
    times = [stamp for _, stamp in events]
    assert 0.055 <= times[1] - times[0] < 0.2
    assert 0.055 <= times[3] - times[2] < 0.2
    assert 0.085 <= times[2] - times[1] < 0.3
