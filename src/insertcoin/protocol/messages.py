"""Payload models for every topic (PROTOCOL.md section 2).

camelCase on the wire, unknown keys ignored (forward compatible), wrong types rejected:
decoding is strict, so `"credits": "5"` or `"online": 1` never slips through.

msgspec rather than pydantic: the agent runs on a Raspberry Pi next to the game, and
pydantic alone would cost it 18 MiB of its 40 MB budget (bench/agent.py).
"""

import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec
import msgspec.inspect
from msgspec import Meta

from insertcoin.protocol.errors import ProtocolError
from insertcoin.protocol.ids import CREDIT_ID_PATTERN, MACHINE_ID_PATTERN, TEXT_PATTERN
from insertcoin.protocol.topics import TopicKind

MAX_PAYLOAD_BYTES = 16 * 1024
MAX_CREDITS_PER_GRANT = 1000
# Bounds that keep every number inside a 32-bit database column and a 64-bit JSON int.
MAX_CREDIT_BALANCE = 1_000_000
MAX_CREDITS_PER_PURCHASE = 100
MAX_PRICE_AMOUNT = 99_999_999  # Stripe's own ceiling for one amount
# How many of its latest applied creditIds a cabinet reports when it (re)connects.
RECENT_APPLIED = 20


def _whole(pattern: str) -> str:
    # The shared patterns end in `$` for pydantic's Rust engine; msgspec uses re.search,
    # where `$` would also match before a trailing newline.
    return pattern.removesuffix("$") + r"\Z"


Timestamp = Annotated[datetime, Meta(tz=True)]
MachineId = Annotated[str, Meta(pattern=_whole(MACHINE_ID_PATTERN))]
CreditId = Annotated[str, Meta(pattern=_whole(CREDIT_ID_PATTERN))]
Reason = Annotated[str, Meta(max_length=500, pattern=_whole(TEXT_PATTERN))]


class Message(msgspec.Struct, frozen=True, kw_only=True, rename="camel", omit_defaults=True):
    """Built by field name in Python; camelCase only on the wire. Optional keys that are
    None are left out of the payload."""

    _timestamps: ClassVar[tuple[str, ...]] = ()

    machine_id: MachineId

    def __post_init__(self) -> None:
        # PROTOCOL: timestamps are UTC with `Z`, whatever zone the sender used.
        for name in self._timestamps:
            moment = getattr(self, name)
            if moment is None:
                continue
            if moment.tzinfo is None:
                raise ValueError(f"{name}: timestamps must be timezone-aware")
            if moment.utcoffset():
                msgspec.structs.force_setattr(self, name, moment.astimezone(UTC))


class CoinPulse(Message, frozen=True, kw_only=True):
    """server → agent: add `credits` once, identified by `creditId`, never after `expiresAt`."""

    _timestamps = ("timestamp", "expires_at")

    credits: Annotated[int, Meta(ge=1, le=MAX_CREDITS_PER_GRANT)]
    timestamp: Timestamp
    credit_id: CreditId
    expires_at: Timestamp


class Ack(Message, frozen=True, kw_only=True):
    _timestamps = ("timestamp",)

    credit_id: CreditId
    result: Literal["applied", "rejected"]
    reason: Reason | None = None
    timestamp: Timestamp


class GameOver(Message, frozen=True, kw_only=True):
    _timestamps = ("timestamp",)

    status: Literal["game_over"]
    timestamp: Timestamp
    credits_left: Annotated[int, Meta(ge=0, le=MAX_CREDIT_BALANCE)] | None = None


class Status(Message, frozen=True, kw_only=True):
    """Retained presence. The Last Will carries only `machineId` and `online: false`.

    `appliedCreditIds` (an addition to PROTOCOL section 2): the cabinet's latest applied
    creditIds, sent when it comes online, so that a grant whose every ack was lost while
    the cabinet was out of reach is still learnt of once it is back."""

    _timestamps = ("timestamp",)

    online: bool
    state: Literal["attract", "playing", "out_of_service"] | None = None
    credits: Annotated[int, Meta(ge=0, le=MAX_CREDIT_BALANCE)] | None = None
    timestamp: Timestamp | None = None
    agent_version: Annotated[str, Meta(max_length=64, pattern=r"^[\x20-\x7e]*\Z")] | None = None
    applied_credit_ids: Annotated[tuple[CreditId, ...], Meta(max_length=RECENT_APPLIED)] | None = (
        None
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.online and (self.state is None or self.credits is None or self.timestamp is None):
            raise ValueError("an online status needs state, credits and timestamp")


class Price(msgspec.Struct, frozen=True, kw_only=True):
    amount: Annotated[int, Meta(ge=0, le=MAX_PRICE_AMOUNT)]
    currency: Annotated[str, Meta(pattern=r"^[a-z]{3}\Z")]


class CabinetConfig(Message, frozen=True, kw_only=True):
    pay_url: Annotated[str, Meta(min_length=1, max_length=2048)]
    price: Price
    credits_per_purchase: Annotated[int, Meta(ge=1, le=MAX_CREDITS_PER_PURCHASE)]
    name: Annotated[str, Meta(max_length=200, pattern=_whole(TEXT_PATTERN))]


MODELS: dict[TopicKind, type[Message]] = {
    TopicKind.COINPULSE: CoinPulse,
    TopicKind.ACK: Ack,
    TopicKind.GAMEOVER: GameOver,
    TopicKind.STATUS: Status,
    TopicKind.CONFIG: CabinetConfig,
}

M = TypeVar("M", bound=Message)

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_ENCODER = msgspec.json.Encoder()
# msgspec's "<what> - at `$.key.sub`" and "Object missing required field `key`".
_AT = re.compile(r"^(?P<what>.*) - at `\$(?:\.(?P<path>.*))?`$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<key>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]*)`$")


def describe(exc: msgspec.ValidationError, root: type[Any], document: str = "payload") -> str:
    """One line naming the key: `credits: expected int >= 1`, `price.amount: required`,
    `result: must be "applied" or "rejected"`."""
    text = str(exc)
    path = ""
    if at := _AT.match(text):
        text, path = at["what"], at["path"] or ""
    if missing := _MISSING.match(text):
        path, text = ".".join(filter(None, [path, missing["key"]])), "required"
    elif unknown := _UNKNOWN.match(text):
        path, text = ".".join(filter(None, [path, unknown["key"]])), "unknown key"
    elif text.startswith("Expected `object`, got") and not path:
        return f"{document} is not a {'JSON object' if document == 'payload' else 'table'}"
    elif text.startswith("Invalid enum value") and (choices := _choices(root, path)):
        quoted = [f'"{choice}"' for choice in choices]
        text = f"must be {' or '.join([', '.join(quoted[:-1]), quoted[-1]])}"
    text = text.replace("`", "")
    return f"{path or document}: {text[:1].lower()}{text[1:]}"


def _choices(root: type[Any], path: str) -> tuple[Any, ...] | None:
    """The values a Literal key allows, found by walking `path` from `root`."""
    info: Any = msgspec.inspect.type_info(root)
    for key in path.split("."):
        info = _unwrap(info)
        if not isinstance(info, msgspec.inspect.StructType):
            return None
        info = next((f.type for f in info.fields if f.encode_name == key), None)
        if info is None:
            return None
    info = _unwrap(info)
    return info.values if isinstance(info, msgspec.inspect.LiteralType) else None


def _unwrap(info: Any) -> Any:
    while True:
        if isinstance(info, msgspec.inspect.Metadata):
            info = info.type
        elif isinstance(info, msgspec.inspect.UnionType):
            info = next(t for t in info.types if not isinstance(t, msgspec.inspect.NoneType))
        else:
            return info


def parse_message(model: type[M], payload: bytes | str) -> M:
    """Validate one payload; raise ProtocolError with a one-line reason."""
    try:
        data = payload.encode() if isinstance(payload, str) else payload
    except UnicodeEncodeError:
        raise ProtocolError("payload is not valid UTF-8") from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = msgspec.json.Decoder(model)
    try:
        message: M = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(describe(exc, model)) from None
    except msgspec.DecodeError:
        raise ProtocolError("payload is not valid JSON") from None
    except UnicodeDecodeError:  # msgspec checks UTF-8 only inside the strings it decodes
        raise ProtocolError("payload is not valid UTF-8") from None
    return message


def dump_message(message: Message) -> bytes:
    return _ENCODER.encode(message)
