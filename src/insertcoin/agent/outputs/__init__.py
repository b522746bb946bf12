"""Where credits leave the agent for the game: coin pulses on a pin, a key, a command.

An output only pulses; the machine decides how many and holds a lock around each grant,
so two grants never interleave their pulses.
"""

from typing import Protocol


class OutputError(Exception):
    """An output could not deliver a pulse; reported in status, never retried."""


class Output(Protocol):
    def pulse(self, credit_id: str, count: int) -> None:
        """Send `count` pulses for `credit_id`; blocks until they are out."""

    def close(self) -> None:
        """Release the pin or device."""
