"""The cabinet's credits and state: decides applied / rejected / ignored for each grant.

Grants are handled one at a time on a worker thread (pulses take hundreds of
milliseconds and must not stall the MQTT network thread), and every pulse happens under
one lock, so two grants, or a grant and a game start, never interleave on the output.
Every credit is spent in the journal before its pulses go out: a crash loses at most the
credit in flight, never doubles one.
"""

import os
import queue
import signal
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Literal

import structlog

from insertcoin.agent.config import CoinConfig
from insertcoin.agent.journal import Journal, Recorded
from insertcoin.agent.outputs import Output, OutputError
from insertcoin.protocol import (
    Ack,
    CoinPulse,
    GameOver,
    Message,
    ProtocolError,
    TopicKind,
    parse_message,
    utc_now,
)

log = structlog.get_logger(__name__)

State = Literal["attract", "playing", "out_of_service"]
Send = Callable[[TopicKind, Message], None]


class Machine:
    def __init__(
        self,
        machine_id: str,
        coin: CoinConfig,
        journal: Journal,
        output: Output,
        *,
        send: Send,
        on_change: Callable[[], None],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.machine_id = machine_id
        self.coin = coin
        self.journal = journal
        self.output = output
        self._send = send
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.RLock()
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self.fault: str | None = None  # why the cabinet is out of service
        # Test hook (tests/agent_faults): "received", "journaled" or "pulsed" makes the
        # process SIGKILL itself at that point of a new grant, to prove each crash is safe.
        self._crash_at = os.environ.get("INSERTCOIN_AGENT_CRASH_AT")

    @property
    def state(self) -> State:
        return "out_of_service" if self.fault else self.journal.counter().state

    @property
    def credits(self) -> int:
        return self.journal.counter().credits

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="agent-grants", daemon=True)
        self._worker.start()
        # Credits journaled before a crash but not yet given to the game.
        with self._lock:
            if self.coin.mode == "pulse":
                self._drain("resume")
            elif self.journal.counter().state == "attract":
                self._start_game("resume")

    def stop(self) -> None:
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(10)

    def deliver(self, payload: bytes) -> None:
        """A `coinpulse` payload off the wire; handled in order on the worker thread."""
        self._queue.put(payload)

    def _work(self) -> None:
        while (payload := self._queue.get()) is not None:
            try:
                self.handle_coinpulse(payload)
            except Exception:
                log.exception("coinpulse_failed")

    def handle_coinpulse(self, payload: bytes) -> None:
        try:
            pulse = parse_message(CoinPulse, payload)
        except ProtocolError as exc:
            log.warning("coinpulse_invalid", reason=exc.reason)
            return
        if pulse.machine_id != self.machine_id:
            log.warning("coinpulse_not_ours", machineId=pulse.machine_id, creditId=pulse.credit_id)
            return
        self._crash_point("received")
        with self._lock:
            recorded = self._decide(pulse)
        self._ack(pulse.credit_id, recorded)

    def _decide(self, pulse: CoinPulse) -> Recorded:
        earlier = self.journal.lookup(pulse.credit_id)
        if earlier is not None:
            log.info("coinpulse_duplicate", creditId=pulse.credit_id, result=earlier.result)
            return earlier
        if pulse.expires_at <= self._clock():
            return self._reject(pulse, "expired")
        if self.fault:
            return self._reject(pulse, f"out of service: {self.fault}")
        recorded = self.journal.record(pulse.credit_id, pulse.credits)
        if recorded.duplicate:
            return recorded
        self._crash_point("journaled")
        log.info("credits_added", creditId=pulse.credit_id, credits=pulse.credits)
        self._on_change()
        if self.coin.mode == "pulse":
            self._drain(pulse.credit_id)
        elif self.journal.counter().state == "attract":
            self._start_game(pulse.credit_id)
        self._crash_point("pulsed")
        return recorded

    def _crash_point(self, point: str) -> None:
        if self._crash_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def _reject(self, pulse: CoinPulse, reason: str) -> Recorded:
        log.warning("coinpulse_rejected", creditId=pulse.credit_id, reason=reason)
        return self.journal.reject(pulse.credit_id, pulse.credits, reason)

    def _ack(self, credit_id: str, recorded: Recorded) -> None:
        ack = Ack(
            machine_id=self.machine_id,
            credit_id=credit_id,
            result=recorded.result,
            reason=recorded.reason,
            timestamp=self._clock(),
        )
        self._send(TopicKind.ACK, ack)

    def _drain(self, credit_id: str) -> None:
        """Pulse mode: every held credit goes to the game, one journaled spend at a time."""
        while not self.fault and self.journal.take_one("attract"):
            self._pulse(credit_id)
        self._on_change()

    def _start_game(self, credit_id: str) -> bool:
        if self.fault or not self.journal.take_one("playing"):
            return False
        log.info("game_started", creditId=credit_id)
        self._pulse(credit_id)
        self._on_change()
        return True

    def _pulse(self, credit_id: str) -> None:
        try:
            self.output.pulse(credit_id, self.coin.pulses_per_credit)
        except OutputError as exc:
            # Never retried: the credit is spent in the journal; the operator sees why.
            self.fault = str(exc)
            log.error("output_failed", creditId=credit_id, reason=self.fault)

    def game_over(self) -> None:
        """The game ended (local API, game process or input): start the next or attract.

        Raises ValueError(reason) in session mode when no game is running."""
        with self._lock:
            if self.coin.mode == "session":
                if self.journal.counter().state != "playing":
                    raise ValueError("no game is running")
                if not self._start_game("game_over"):
                    self.journal.set_state("attract")
                credits_left: int | None = self.journal.counter().credits
            else:
                # Pulse mode: the game holds the credits; the agent cannot know how many.
                credits_left = None
            log.info("game_over", creditsLeft=credits_left)
            self._send(
                TopicKind.GAMEOVER,
                GameOver(
                    machine_id=self.machine_id,
                    status="game_over",
                    timestamp=self._clock(),
                    credits_left=credits_left,
                ),
            )
            self._on_change()
