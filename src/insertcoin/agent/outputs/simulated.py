"""An output that only records: for demos and tests, where no game listens."""

import threading
from collections import Counter


class SimulatedOutput:
    def __init__(self) -> None:
        self.pulses: Counter[str] = Counter()  # creditId → pulses sent
        self.log: list[str] = []  # one entry per pulse, in order (proves no interleaving)
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        with self._lock:
            return len(self.log)

    def pulse(self, credit_id: str, count: int) -> None:
        with self._lock:
            self.pulses[credit_id] += count
            self.log.extend([credit_id] * count)

    def close(self) -> None:
        pass
