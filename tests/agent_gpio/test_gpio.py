"""GPIO coin output and game-over input, on gpiozero's MockFactory (no Raspberry Pi)."""

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from insertcoin.agent.config import ConfigError, load_config
from insertcoin.agent.inputs.gpio import GpioGameOver
from insertcoin.agent.outputs import OutputError
from insertcoin.agent.outputs.gpio import GpioOutput

# The machine is shared with other test runs: timing is checked loosely, structure exactly.
TOLERANCE_S = 0.04


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    mock = MockFactory()
    yield mock
    mock.reset()


def _runs(pin: Any) -> list[tuple[bool, float]]:
    """(level, seconds held) for each level after the first change; MockPin records each
    change as the time since the previous one, so entry i+1 holds how long entry i lasted."""
    states = pin.states
    return [(states[i].state, states[i + 1].timestamp) for i in range(1, len(states) - 1)]


def test_three_pulses_have_the_configured_width_and_gap(factory: MockFactory) -> None:
    """3 pulses of 100 ms with 150 ms gaps: exactly 3 rising edges, each high ≈ 100 ms,
    each gap ≈ 150 ms, and the pin ends low."""
    output = GpioOutput(17, True, 100, 150, pin_factory=factory)
    pin = factory.pin(17)
    pin.clear_states()
    output.pulse("credit-1", 3)

    levels = [state.state for state in pin.states]
    assert levels == [False, True, False, True, False, True, False]
    runs = _runs(pin)
    highs = [held for level, held in runs if level]
    gaps = [held for level, held in runs if not level]
    assert len(highs) == 3
    assert len(gaps) == 2
    for held in highs:
        assert held == pytest.approx(0.100, abs=TOLERANCE_S)
    for held in gaps:
        assert held == pytest.approx(0.150, abs=TOLERANCE_S)
    assert pin.state is False
    output.close()


def test_active_low_inverts_the_levels(factory: MockFactory) -> None:
    """With active_high false the pin idles high and each pulse drives it low."""
    output = GpioOutput(22, False, 50, 50, pin_factory=factory)
    pin = factory.pin(22)
    assert pin.state is True
    pin.clear_states()
    output.pulse("credit-2", 2)

    assert [state.state for state in pin.states] == [True, False, True, False, True]
    lows = [held for level, held in _runs(pin) if not level]
    assert len(lows) == 2
    for held in lows:
        assert held == pytest.approx(0.050, abs=TOLERANCE_S)
    output.close()


def test_zero_pulses_leave_the_pin_alone(factory: MockFactory) -> None:
    """pulse(…, 0) drives nothing, and a negative count is refused."""
    output = GpioOutput(17, True, 50, 50, pin_factory=factory)
    pin = factory.pin(17)
    pin.clear_states()
    output.pulse("credit-0", 0)
    assert len(pin.states) == 1
    with pytest.raises(ValueError, match="count"):
        output.pulse("credit-neg", -1)
    output.close()


def test_concurrent_calls_do_not_interleave(factory: MockFactory) -> None:
    """Two threads pulsing one output at once: every pulse keeps its full width and every
    gap (including the one between the two calls) stays ≥ gap_ms, so the board counts
    exactly 3 + 2 coins."""
    output = GpioOutput(17, True, 60, 80, pin_factory=factory)
    pin = factory.pin(17)
    pin.clear_states()
    start = threading.Barrier(2)

    def grant(credit_id: str, count: int) -> None:
        start.wait()
        output.pulse(credit_id, count)

    threads = [
        threading.Thread(target=grant, args=("credit-a", 3)),
        threading.Thread(target=grant, args=("credit-b", 2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    runs = _runs(pin)
    highs = [held for level, held in runs if level]
    gaps = [held for level, held in runs if not level]
    assert len(highs) == 5
    assert len(gaps) == 4
    for held in highs:
        assert held == pytest.approx(0.060, abs=TOLERANCE_S)
    for held in gaps:
        assert held >= 0.080 - 0.005
    output.close()


def test_back_to_back_calls_keep_the_gap(factory: MockFactory) -> None:
    """No trailing gap after the last pulse, but the next call waits out gap_ms before its
    first pulse, so two grants in a row are never merged into one long pulse."""
    output = GpioOutput(17, True, 50, 120, pin_factory=factory)
    pin = factory.pin(17)
    pin.clear_states()
    started = time.monotonic()
    output.pulse("credit-a", 1)
    assert time.monotonic() - started < 0.050 + TOLERANCE_S
    output.pulse("credit-b", 1)

    gaps = [held for level, held in _runs(pin) if not level]
    assert len(gaps) == 1
    assert gaps[0] == pytest.approx(0.120, abs=TOLERANCE_S)
    output.close()


def _bounce(pin: Any, final_low: bool, chatter: int = 4) -> None:
    """A mechanical contact settling: a few sub-millisecond flips ending at `final_low`."""
    for _ in range(chatter):
        if final_low:
            pin.drive_low()
            pin.drive_high()
        else:
            pin.drive_high()
            pin.drive_low()
    if final_low:
        pin.drive_low()
    else:
        pin.drive_high()


def test_each_press_calls_back_once_despite_bounce(factory: MockFactory) -> None:
    """A bouncing press and a bouncing release call on_game_over exactly once; a second
    press after the line was quiet calls it again."""
    calls: list[float] = []
    game_over = GpioGameOver(27, lambda: calls.append(time.monotonic()), pin_factory=factory)
    pin = factory.pin(27)
    assert pin.state is True  # pull-up: idle high, a press pulls it to GND

    _bounce(pin, final_low=True)
    assert len(calls) == 1
    time.sleep(0.2)
    _bounce(pin, final_low=False)
    assert len(calls) == 1
    time.sleep(0.2)
    _bounce(pin, final_low=True)
    assert len(calls) == 2
    game_over.close()


def test_pull_down_input_fires_on_rising_edge(factory: MockFactory) -> None:
    """With pull_up false the input idles low and a press drives it high."""
    calls: list[None] = []
    game_over = GpioGameOver(
        5, lambda: calls.append(None), pull_up=False, bounce_ms=20, pin_factory=factory
    )
    pin = factory.pin(5)
    pin.drive_high()
    assert calls == [None]
    game_over.close()


def test_a_failing_callback_does_not_stop_later_presses(factory: MockFactory) -> None:
    """An exception from on_game_over is logged, and the next press still calls back."""
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    game_over = GpioGameOver(6, flaky, bounce_ms=10, pin_factory=factory)
    pin = factory.pin(6)
    pin.drive_low()
    time.sleep(0.05)
    pin.drive_high()
    time.sleep(0.05)
    pin.drive_low()
    assert len(calls) == 2
    game_over.close()


def test_missing_gpiozero_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without gpiozero installed, both GPIO classes stop start-up with a one-line config
    error naming the key and the pip command that fixes it."""
    monkeypatch.setitem(sys.modules, "gpiozero", None)
    hint = re.escape('pip install "insertcoin[gpio]"')
    with pytest.raises(ConfigError, match=f"^coin.output: .*{hint}"):
        GpioOutput(17, True, 100, 150)
    with pytest.raises(ConfigError, match=f"^gameover.source: .*{hint}"):
        GpioGameOver(27, lambda: None)


def test_a_pin_already_in_use_is_a_config_error(factory: MockFactory) -> None:
    """Opening a pin another device holds stops start-up with a line naming coin.pin."""
    first = GpioOutput(17, True, 100, 150, pin_factory=factory)
    with pytest.raises(ConfigError, match=r"^coin\.pin: cannot open GPIO17"):
        GpioOutput(17, True, 100, 150, pin_factory=factory)
    first.close()


def test_the_example_config_loads() -> None:
    """deploy/cabinet.example.toml is a valid section 7 file for the gpio output."""
    config = load_config(Path(__file__).resolve().parents[2] / "deploy/cabinet.example.toml")
    assert config.coin.output == "gpio"
    assert config.coin.pin == 17
    assert config.coin.active_high is True


def test_a_pin_failure_is_an_output_error_and_the_pin_is_released(factory: MockFactory) -> None:
    """A driver error mid-grant surfaces as OutputError (reported, never retried) and the
    pulses already sent are not repeated."""
    output = GpioOutput(17, True, 20, 20, pin_factory=factory)
    pin = factory.pin(17)
    pin.clear_states()
    real_on = output._device.on
    calls = 0

    def failing_on() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("gpiochip gone")
        real_on()

    output._device.on = failing_on
    with pytest.raises(OutputError, match="gpio pin 17"):
        output.pulse("credit-x", 3)
    assert [state.state for state in pin.states] == [False, True, False]
    output.close()
