"""Coin key presses on a virtual keyboard (`output = "keyboard"`): a uinput device that
MAME and RetroArch read like a real keyboard, so each press counts as a coin."""

import threading
import time
from typing import Any

import structlog

from insertcoin.agent.config import ConfigError
from insertcoin.agent.outputs import OutputError

log = structlog.get_logger(__name__)

KEYBOARD_EXTRA_HINT = 'keyboard output needs evdev: pip install "insertcoin[keyboard]"'
UINPUT_HINT = "sudo modprobe uinput, and give the agent's user access"


def _evdev() -> Any:
    try:
        # Imported here: a Raspberry Pi driving a pin has no evdev.
        import evdev  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(f"coin.output: {KEYBOARD_EXTRA_HINT}") from exc
    return evdev


def key_code(key: str) -> int:
    """The Linux key code of `key` (e.g. "KEY_5"); ConfigError naming coin.key otherwise."""
    code = _evdev().ecodes.ecodes.get(key)
    if not isinstance(code, int) or not key.startswith("KEY_"):
        raise ConfigError(f'coin.key: unknown key "{key}"')
    return code


class KeyboardOutput:
    """Presses `key` for `pulse_ms`, with at least `gap_ms` released between presses.

    As with the GPIO output, the gap is enforced before each press (measured from the
    previous release), so `pulse` returns when the last key is up and back-to-back calls
    still never merge two presses into one.
    """

    def __init__(
        self, key: str, pulse_ms: int, gap_ms: int, *, devnode: str = "/dev/uinput"
    ) -> None:
        if pulse_ms <= 0 or gap_ms <= 0:
            raise ValueError("pulse_ms and gap_ms must be positive")
        evdev = _evdev()
        self._code = key_code(key)
        self._ecodes = evdev.ecodes
        try:
            self._ui: Any = evdev.UInput(
                {evdev.ecodes.EV_KEY: [self._code]}, name="insertcoin", devnode=devnode
            )
        except (evdev.UInputError, OSError) as exc:
            raise ConfigError(f"coin.output: cannot open {devnode} ({exc}): {UINPUT_HINT}") from exc
        self._pulse_s = pulse_ms / 1000
        self._gap_s = gap_ms / 1000
        self._lock = threading.Lock()
        self._last_up = time.monotonic() - self._gap_s

    @property
    def device_path(self) -> str | None:
        """The /dev/input/event* node of the virtual keyboard (None if unreadable)."""
        device = self._ui.device
        return None if device is None else str(device.path)

    def pulse(self, credit_id: str, count: int) -> None:
        if count < 0:
            raise ValueError("count must not be negative")
        with self._lock:
            for index in range(count):
                _sleep_until(self._last_up + self._gap_s)
                try:
                    self._press()
                except OSError as exc:
                    # Never retried: the game may already have counted this press.
                    log.error("key_press_failed", creditId=credit_id, pulse=index, error=str(exc))
                    raise OutputError(f"keyboard: {exc}") from exc
                log.debug("key_press", creditId=credit_id, pulse=index, count=count)

    def _press(self) -> None:
        key = self._ecodes.EV_KEY
        try:
            self._ui.write(key, self._code, 1)
            self._ui.syn()
            _sleep_until(time.monotonic() + self._pulse_s)
        finally:
            # Never leave the coin key held down, even if interrupted.
            self._ui.write(key, self._code, 0)
            self._ui.syn()
            self._last_up = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._ui.close()


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
