from dataclasses import dataclass
from enum import StrEnum

from insertcoin.protocol.errors import ProtocolError
from insertcoin.protocol.ids import is_machine_id

DEFAULT_PREFIX = "arcade/machine"


class TopicKind(StrEnum):
    COINPULSE = "coinpulse"
    ACK = "ack"
    GAMEOVER = "gameover"
    STATUS = "status"
    CONFIG = "config"


# What each side publishes; the other side subscribes.
SERVER_PUBLISHES = frozenset({TopicKind.COINPULSE, TopicKind.CONFIG})
CABINET_PUBLISHES = frozenset({TopicKind.ACK, TopicKind.GAMEOVER, TopicKind.STATUS})


@dataclass(frozen=True)
class Topics:
    """Builds and parses `{prefix}/{machineId}/{kind}` topics."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.endswith("/"):
            raise ProtocolError(f"invalid topic prefix {self.prefix!r}")

    def topic(self, machine_id: str, kind: TopicKind) -> str:
        if not is_machine_id(machine_id):
            raise ProtocolError(f"invalid machineId {machine_id!r}")
        return f"{self.prefix}/{machine_id}/{kind.value}"

    def wildcard(self, kind: TopicKind) -> str:
        return f"{self.prefix}/+/{kind.value}"

    def shared(self, kind: TopicKind, group: str) -> str:
        return f"$share/{group}/{self.wildcard(kind)}"

    def parse(self, topic: str) -> tuple[str, TopicKind]:
        """Return (machineId, kind) for a topic under this prefix."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ProtocolError(f"topic {topic!r} is not under {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 2:
            raise ProtocolError(f"topic {topic!r} is not {self.prefix}/<machineId>/<kind>")
        machine_id, kind = parts
        if not is_machine_id(machine_id):
            raise ProtocolError(f"invalid machineId {machine_id!r} in topic")
        try:
            return machine_id, TopicKind(kind)
        except ValueError:
            raise ProtocolError(f"unknown topic kind {kind!r}") from None
