"""Payload models for every topic (PROTOCOL.md section 2).

camelCase on the wire, unknown keys ignored (forward compatible), wrong types rejected:
models are strict, so `"credits": "5"` or `"online": 1` never slips through.
"""

from datetime import datetime
from typing import Annotated, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from insertcoin.protocol.errors import ProtocolError
from insertcoin.protocol.ids import CREDIT_ID_PATTERN, MACHINE_ID_PATTERN, TEXT_PATTERN
from insertcoin.protocol.timestamps import format_timestamp
from insertcoin.protocol.topics import TopicKind

MAX_PAYLOAD_BYTES = 16 * 1024
MAX_CREDITS_PER_GRANT = 1000
# Bounds that keep every number inside a 32-bit database column and a 64-bit JSON int.
MAX_CREDIT_BALANCE = 1_000_000
MAX_CREDITS_PER_PURCHASE = 100
MAX_PRICE_AMOUNT = 99_999_999  # Stripe's own ceiling for one amount


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamp needs a time zone (RFC 3339, e.g. 2024-07-01T12:00:00Z)")
    return moment


Timestamp = Annotated[
    datetime, AfterValidator(_aware), PlainSerializer(format_timestamp, return_type=str)
]
MachineId = Annotated[str, Field(pattern=MACHINE_ID_PATTERN)]
CreditId = Annotated[str, Field(pattern=CREDIT_ID_PATTERN)]
Reason = Annotated[str, Field(max_length=500, pattern=TEXT_PATTERN)]


class _Message(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        strict=True,
        extra="ignore",
        alias_generator=to_camel,
        # Python code builds messages by field name; the wire is camelCase only
        # (parse_message validates by alias alone).
        validate_by_name=True,
    )

    machine_id: MachineId


class CoinPulse(_Message):
    """server → agent: add `credits` once, identified by `creditId`, never after `expiresAt`."""

    credits: Annotated[int, Field(ge=1, le=MAX_CREDITS_PER_GRANT)]
    timestamp: Timestamp
    credit_id: CreditId
    expires_at: Timestamp


class Ack(_Message):
    credit_id: CreditId
    result: Literal["applied", "rejected"]
    reason: Reason | None = None
    timestamp: Timestamp


class GameOver(_Message):
    status: Literal["game_over"]
    timestamp: Timestamp
    credits_left: Annotated[int, Field(ge=0, le=MAX_CREDIT_BALANCE)] | None = None


class Status(_Message):
    """Retained presence. The Last Will carries only `machineId` and `online: false`."""

    online: bool
    state: Literal["attract", "playing", "out_of_service"] | None = None
    credits: Annotated[int, Field(ge=0, le=MAX_CREDIT_BALANCE)] | None = None
    timestamp: Timestamp | None = None
    agent_version: Annotated[str, Field(max_length=64, pattern=r"^[\x20-\x7e]*$")] | None = None

    @model_validator(mode="after")
    def _online_status_is_complete(self) -> "Status":
        if self.online and (self.state is None or self.credits is None or self.timestamp is None):
            raise ValueError("an online status needs state, credits and timestamp")
        return self


class Price(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    amount: Annotated[int, Field(ge=0, le=MAX_PRICE_AMOUNT)]
    currency: Annotated[str, Field(pattern=r"^[a-z]{3}$")]


class CabinetConfig(_Message):
    pay_url: Annotated[str, Field(min_length=1, max_length=2048)]
    price: Price
    credits_per_purchase: Annotated[int, Field(ge=1, le=MAX_CREDITS_PER_PURCHASE)]
    name: Annotated[str, Field(max_length=200, pattern=TEXT_PATTERN)]


MODELS: dict[TopicKind, type[_Message]] = {
    TopicKind.COINPULSE: CoinPulse,
    TopicKind.ACK: Ack,
    TopicKind.GAMEOVER: GameOver,
    TopicKind.STATUS: Status,
    TopicKind.CONFIG: CabinetConfig,
}

M = TypeVar("M", bound=_Message)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return "payload is not valid JSON"
    if err["type"] == "model_type" and not err["loc"]:
        return "payload is not a JSON object"
    where = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{where}: {err['msg']}"


def parse_message(model: type[M], payload: bytes | str) -> M:
    """Validate one payload; raise ProtocolError with a one-line reason."""
    try:
        data = payload.encode() if isinstance(payload, str) else payload
    except UnicodeEncodeError:
        raise ProtocolError("payload is not valid UTF-8") from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        # JSON input: strict mode still accepts RFC 3339 strings for timestamps.
        return model.model_validate_json(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise ProtocolError(_first_error(exc)) from None


def dump_message(message: BaseModel) -> bytes:
    return orjson.dumps(message.model_dump(mode="json", by_alias=True, exclude_none=True))
