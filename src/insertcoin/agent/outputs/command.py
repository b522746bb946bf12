"""An output that runs a command once per pulse (e.g. a script that pokes the game)."""

import os
import subprocess
import time

import structlog

from insertcoin.agent.outputs import OutputError

log = structlog.get_logger(__name__)

TIMEOUT_SECONDS = 10.0


class CommandOutput:
    def __init__(self, command: list[str], machine_id: str, gap_ms: int) -> None:
        self.command = command
        self.machine_id = machine_id
        self.gap = gap_ms / 1000

    def pulse(self, credit_id: str, count: int) -> None:
        env = {
            **os.environ,
            "INSERTCOIN_MACHINE_ID": self.machine_id,
            "INSERTCOIN_CREDIT_ID": credit_id,
        }
        for index in range(count):
            env["INSERTCOIN_PULSE_INDEX"] = str(index)
            try:
                done = subprocess.run(
                    self.command, env=env, timeout=TIMEOUT_SECONDS, check=False, capture_output=True
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                # Never retried: a retry after a command that half-worked could double a credit.
                raise OutputError(f"coin command failed: {exc}") from None
            if done.returncode != 0:
                log.error(
                    "coin_command_failed",
                    creditId=credit_id,
                    pulse=index,
                    exitCode=done.returncode,
                    stderr=done.stderr.decode(errors="replace")[-500:],
                )
                raise OutputError(f"coin command exited with {done.returncode}")
            if index + 1 < count:
                time.sleep(self.gap)

    def close(self) -> None:
        pass
