"""The wire contract between server and cabinet agents (PROTOCOL.md section 2).

Pure: imports neither `insertcoin.server` nor `insertcoin.agent`; both sides speak only
through it.
"""

from insertcoin.protocol.errors import ProtocolError
from insertcoin.protocol.ids import is_machine_id, new_credit_id, validate_machine_id
from insertcoin.protocol.messages import (
    Ack,
    CabinetConfig,
    CoinPulse,
    GameOver,
    Message,
    Price,
    Status,
    dump_message,
    parse_message,
)
from insertcoin.protocol.timestamps import format_timestamp, utc_now
from insertcoin.protocol.topics import TopicKind, Topics

__all__ = [
    "Ack",
    "CabinetConfig",
    "CoinPulse",
    "GameOver",
    "Message",
    "Price",
    "ProtocolError",
    "Status",
    "TopicKind",
    "Topics",
    "dump_message",
    "format_timestamp",
    "is_machine_id",
    "new_credit_id",
    "parse_message",
    "utc_now",
    "validate_machine_id",
]
