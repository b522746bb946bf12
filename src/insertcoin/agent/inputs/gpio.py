"""Game over from a GPIO input (`source = "gpio"`): a button or a game-board output
pulling the pin to GND (or to 3.3 V with `pull_up = false`)."""

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from insertcoin.agent.config import ConfigError

log = structlog.get_logger(__name__)

GPIO_EXTRA_HINT = 'GPIO support needs gpiozero: pip install "insertcoin[gpio]"'


class GpioGameOver:
    """Calls `on_game_over` once per press.

    Debouncing is done here rather than left to the pin driver, because drivers differ
    (lgpio filters in the kernel, the mock factory not at all): a press counts only when
    the line was quiet for `bounce_ms` before it, so contact chatter on press *and* on
    release is ignored, while a deliberate second press later still counts.
    """

    def __init__(
        self,
        pin: int,
        on_game_over: Callable[[], None],
        *,
        pull_up: bool = True,
        bounce_ms: int = 50,
        pin_factory: Any = None,
    ) -> None:
        if bounce_ms < 0:
            raise ValueError("bounce_ms must not be negative")
        try:
            import gpiozero  # type: ignore[import-untyped]  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError(f"gameover.source: {GPIO_EXTRA_HINT}") from exc
        self._on_game_over = on_game_over
        self._bounce_s = bounce_ms / 1000
        self._lock = threading.Lock()
        self._last_edge = float("-inf")
        try:
            self._button: Any = gpiozero.Button(pin, pull_up=pull_up, pin_factory=pin_factory)
        except gpiozero.GPIOZeroError as exc:
            raise ConfigError(f"gameover.pin: cannot open GPIO{pin} ({exc})") from exc
        self._button.when_activated = self._pressed
        self._button.when_deactivated = self._released

    def close(self) -> None:
        self._button.when_activated = None
        self._button.when_deactivated = None
        self._button.close()

    def _edge_is_clean(self) -> bool:
        with self._lock:
            now = time.monotonic()
            quiet = now - self._last_edge >= self._bounce_s
            self._last_edge = now
            return quiet

    def _pressed(self) -> None:
        if not self._edge_is_clean():
            return
        try:
            self._on_game_over()
        except Exception:
            # Runs on gpiozero's event thread: an error here must not silence later presses.
            log.exception("gameover_callback_failed", source="gpio")

    def _released(self) -> None:
        self._edge_is_clean()
