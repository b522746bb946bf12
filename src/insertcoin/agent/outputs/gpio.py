"""Coin pulses on a GPIO pin (`output = "gpio"`): the pin closes a coin-mech input through
an optocoupler, so the game board counts each pulse as a coin dropped in the slot."""

import threading
import time
from typing import Any

import structlog

from insertcoin.agent.config import ConfigError
from insertcoin.agent.outputs import OutputError

log = structlog.get_logger(__name__)

GPIO_EXTRA_HINT = 'GPIO support needs gpiozero: pip install "insertcoin[gpio]"'


class GpioOutput:
    """Drives `count` pulses of `pulse_ms` high (or low, when `active_high` is false)
    separated by `gap_ms` idle.

    `pulse` returns as soon as the last pulse ends (no trailing gap); instead, the gap is
    enforced before each pulse, measured from the end of the previous one, so back-to-back
    calls never merge two pulses into one the game board would count once.
    """

    def __init__(
        self,
        pin: int,
        active_high: bool,
        pulse_ms: int,
        gap_ms: int,
        *,
        pin_factory: Any = None,
    ) -> None:
        if pulse_ms <= 0 or gap_ms <= 0:
            raise ValueError("pulse_ms and gap_ms must be positive")
        try:
            # Imported here: a mini-PC using the keyboard or command output has no gpiozero.
            import gpiozero  # type: ignore[import-untyped]  # noqa: PLC0415
        except ImportError as exc:
            # A ConfigError, so `insertcoin agent` stops with this one line, not a traceback.
            raise ConfigError(f"coin.output: {GPIO_EXTRA_HINT}") from exc
        self._pin = pin
        try:
            self._device: Any = gpiozero.DigitalOutputDevice(
                pin, active_high=active_high, initial_value=False, pin_factory=pin_factory
            )
        except gpiozero.GPIOZeroError as exc:
            # Usually a missing pin driver (lgpio) or no access to /dev/gpiochip*.
            raise ConfigError(f"coin.pin: cannot open GPIO{pin} ({exc})") from exc
        self._pulse_s = pulse_ms / 1000
        self._gap_s = gap_ms / 1000
        # The caller serializes grants; this lock only keeps a mistaken concurrent call
        # from interleaving pulses on the wire.
        self._lock = threading.Lock()
        self._last_off = time.monotonic() - self._gap_s

    def pulse(self, credit_id: str, count: int) -> None:
        if count < 0:
            raise ValueError("count must not be negative")
        with self._lock:
            for index in range(count):
                self._wait_until(self._last_off + self._gap_s)
                try:
                    self._one_pulse()
                except Exception as exc:
                    # Never retried: the board may already have counted this pulse.
                    log.error("gpio_pulse_failed", creditId=credit_id, pulse=index, error=str(exc))
                    raise OutputError(f"gpio pin {self._pin}: {exc}") from exc
                log.debug("gpio_pulse", creditId=credit_id, pulse=index, count=count)

    def _one_pulse(self) -> None:
        try:
            self._device.on()
            self._wait_until(time.monotonic() + self._pulse_s)
        finally:
            # Never leave the coin input held closed, even if interrupted.
            self._device.off()
            self._last_off = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._device.close()

    @staticmethod
    def _wait_until(deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
