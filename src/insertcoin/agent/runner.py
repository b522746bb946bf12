"""Wires the agent: config → journal → output → machine → MQTT session → screen."""

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from insertcoin import __version__
from insertcoin.agent.config import AgentConfig
from insertcoin.agent.inputs.gpio import GpioGameOver
from insertcoin.agent.inputs.process import ProcessGames
from insertcoin.agent.journal import Journal
from insertcoin.agent.machine import Machine
from insertcoin.agent.outputs import Output
from insertcoin.agent.outputs.command import CommandOutput
from insertcoin.agent.outputs.gpio import GpioOutput
from insertcoin.agent.outputs.keyboard import KeyboardOutput
from insertcoin.agent.outputs.simulated import SimulatedOutput
from insertcoin.agent.screen import Screen
from insertcoin.agent.session import Session
from insertcoin.protocol import (
    CabinetConfig,
    Message,
    ProtocolError,
    Status,
    TopicKind,
    dump_message,
    parse_message,
    utc_now,
)
from insertcoin.protocol.messages import RECENT_APPLIED

log = structlog.get_logger(__name__)

Listener = Callable[[], None]


def build_output(config: AgentConfig) -> Output:
    coin = config.coin
    if coin.output == "simulated":
        return SimulatedOutput()
    if coin.output == "command":
        assert coin.command is not None  # the config validator demands it
        return CommandOutput(coin.command, config.machine_id, coin.gap_ms)
    if coin.output == "gpio":
        assert coin.pin is not None  # the config validator demands it
        return GpioOutput(coin.pin, coin.active_high, coin.pulse_ms, coin.gap_ms)
    return KeyboardOutput(coin.key, coin.pulse_ms, coin.gap_ms)


class Agent:
    """The running cabinet. `snapshot()`, `game_over()` and `subscribe()` are what the
    local screen and API use; all three are safe from any thread."""

    def __init__(self, config: AgentConfig, output: Output | None = None) -> None:
        self.config = config
        self.machine_id = config.machine_id
        self.output = output or build_output(config)
        self.journal = Journal(Path(config.journal.path))
        self.machine = Machine(
            config.machine_id,
            config.coin,
            self.journal,
            self.output,
            send=self._send,
            on_change=self._changed,
        )
        self.session = Session(
            config,
            will=dump_message(Status(machine_id=self.machine_id, online=False)),
            on_message=self._received,
            on_online=self._online_changed,
        )
        self.cabinet: CabinetConfig | None = None
        self._listeners: list[Listener] = []
        self._listeners_lock = threading.Lock()
        self._screen = Screen(config.screen.listen, self)
        self._gameover_input: GpioGameOver | None = None
        if config.gameover.source == "gpio":
            assert config.gameover.pin is not None  # the config validator demands it
            self._gameover_input = GpioGameOver(config.gameover.pin, self._input_game_over)
        self._games: ProcessGames | None = None
        if config.gameover.source == "process":
            assert config.gameover.command is not None  # the config validator demands it
            self._games = ProcessGames(
                config.gameover.command,
                self._game_env,
                self._input_game_over,
                is_playing=lambda: self.machine.state == "playing",
            )
            self.subscribe(self._games.changed)

    def start(self) -> None:
        self.machine.start()
        if self._games is not None:
            # A game that was playing when the agent last stopped is launched again.
            self._games.changed()
        self.session.start()
        self._screen.start()
        log.info("agent_started", machineId=self.machine_id, mode=self.config.coin.mode)

    def _input_game_over(self) -> None:
        try:
            self.game_over()
        except ValueError as exc:
            log.info("game_over_ignored", reason=str(exc))

    def _game_env(self) -> dict[str, str]:
        return {
            "INSERTCOIN_MACHINE_ID": self.machine_id,
            "INSERTCOIN_CREDITS": str(self.machine.credits),
        }

    def stop(self) -> None:
        if self._games is not None:
            self._games.stop()
        if self._gameover_input is not None:
            self._gameover_input.close()
        self._screen.stop()
        self.machine.stop()
        self.session.stop(farewell=dump_message(self._status(online=False)))
        self.output.close()
        self.journal.close()

    def wait_online(self, timeout: float) -> bool:
        return self.session.wait_connected(timeout)

    def snapshot(self) -> dict[str, Any]:
        cabinet = self.cabinet
        return {
            "machineId": self.machine_id,
            "online": self.session.connected,
            "state": self.machine.state,
            "credits": self.machine.credits,
            "mode": self.config.coin.mode,
            "price": msgspec.structs.asdict(cabinet.price) if cabinet else None,
            "creditsPerPurchase": cabinet.credits_per_purchase if cabinet else None,
            "payUrl": cabinet.pay_url if cabinet else None,
            "name": cabinet.name if cabinet else None,
        }

    def game_over(self) -> dict[str, Any]:
        """End the running game; returns the new snapshot. ValueError(reason) when none runs."""
        self.machine.game_over()
        return self.snapshot()

    def subscribe(self, callback: Listener) -> None:
        """Call `callback()` after every change of the snapshot (from any thread)."""
        with self._listeners_lock:
            self._listeners.append(callback)

    def _status(self, *, online: bool, applied: tuple[str, ...] | None = None) -> Status:
        return Status(
            machine_id=self.machine_id,
            online=online,
            state=self.machine.state,
            credits=self.machine.credits,
            timestamp=utc_now(),
            agent_version=__version__,
            applied_credit_ids=applied,
        )

    def _send(self, kind: TopicKind, message: Message) -> None:
        self.session.publish(kind, dump_message(message))

    def _changed(self) -> None:
        self.session.publish(TopicKind.STATUS, dump_message(self._status(online=True)), retain=True)
        self._notify()

    def _notify(self) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.exception("listener_failed")

    def _online_changed(self, online: bool) -> None:
        if online:
            # Retained: replaces the Will's offline status a previous drop may have left.
            # It names the latest applied creditIds: an ack lost while the server had
            # stopped re-sending (expiresAt + grace) would otherwise never be known.
            applied = self.journal.recent_applied(RECENT_APPLIED)
            status = self._status(online=True, applied=applied or None)
            self.session.publish(TopicKind.STATUS, dump_message(status), retain=True)
        self._notify()

    def _received(self, kind: TopicKind, payload: bytes) -> None:
        if kind is TopicKind.COINPULSE:
            self.machine.deliver(payload)
            return
        try:
            cabinet = parse_message(CabinetConfig, payload)
        except ProtocolError as exc:
            log.warning("config_invalid", reason=exc.reason)
            return
        if cabinet.machine_id != self.machine_id:
            log.warning("config_not_ours", machineId=cabinet.machine_id)
            return
        self.cabinet = cabinet
        self._notify()
