"""Game over from a game process (`source = "process"`): the agent launches the game
command when a game starts, and the command's exit is the game over."""

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

STOP_GRACE_SECONDS = 5.0


class ProcessGames:
    """Runs `command` once per game, with `agent_env()` added to its environment.

    Call `changed()` after every change of the agent: when `is_playing()` and no game
    process runs, one is launched. Each game runs on its own thread, so `on_exit` (the
    agent's game over, which may start the next game and notify again) never runs inside
    the notification that launched it. A command that cannot start counts as a game that
    ended at once, so the cabinet is never left stuck in `playing`.
    """

    def __init__(
        self,
        command: list[str],
        agent_env: Callable[[], Mapping[str, str]],
        on_exit: Callable[[], None],
        *,
        is_playing: Callable[[], bool],
    ) -> None:
        self._command = command
        self._agent_env = agent_env
        self._on_exit = on_exit
        self._is_playing = is_playing
        self._lock = threading.Lock()
        self._game: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # While a game is being ended, the notifications it causes must not launch the
        # next game: the game thread checks again itself once the game over is done.
        self._ending = False
        self._stopped = False

    @property
    def running(self) -> bool:
        with self._lock:
            return self._process is not None

    def changed(self) -> None:
        with self._lock:
            if self._stopped or self._ending or self._game is not None:
                return
            if not self._is_playing():
                return
            self._game = threading.Thread(target=self._play, name="agent-game", daemon=True)
            self._game.start()

    def stop(self) -> None:
        """Terminate a running game (it did not end: no game over) and launch no more."""
        with self._lock:
            self._stopped = True
            process, game = self._process, self._game
        if process is not None:
            _terminate(process)
        if game is not None:
            game.join(STOP_GRACE_SECONDS + 5)

    def _play(self) -> None:
        with self._lock:
            process = None if self._stopped else self._launch()
            self._process = process
        if process is not None:
            code = process.wait()
            log.info("game_process_exited", exitCode=code, pid=process.pid)
        with self._lock:
            self._process = None
            if self._stopped:
                self._game = None
                return
            self._ending = True
        try:
            self._on_exit()
        except Exception:
            log.exception("gameover_callback_failed", source="process")
        with self._lock:
            self._ending = False
            self._game = None
        self.changed()  # the game over may have started the next game

    def _launch(self) -> subprocess.Popen[bytes] | None:
        env = {**os.environ, **self._agent_env()}
        try:
            # Its own session, so stopping reaches a launcher script's children too.
            process = subprocess.Popen(
                self._command, env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:
            log.error("game_process_failed", command=self._command[0], error=str(exc))
            return None
        log.info("game_process_started", pid=process.pid, credits=env.get("INSERTCOIN_CREDITS"))
        return process


def _terminate(process: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(STOP_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            log.warning("game_process_not_stopping", pid=process.pid)
