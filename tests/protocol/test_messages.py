"""Payload models (PROTOCOL §2): camelCase JSON, seed-compatible keys kept, unknown keys
ignored, and anything else — wrong types, missing keys, non-objects, bad bytes, oversized
payloads — refused with a ProtocolError and a one-line reason."""

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insertcoin.protocol import (
    Ack,
    CabinetConfig,
    CoinPulse,
    GameOver,
    Price,
    ProtocolError,
    Status,
    dump_message,
    format_timestamp,
    parse_message,
)
from insertcoin.protocol.ids import CREDIT_ID_PATTERN, MACHINE_ID_PATTERN, TEXT_PATTERN
from insertcoin.protocol.messages import (
    MAX_CREDIT_BALANCE,
    MAX_CREDITS_PER_GRANT,
    MAX_PAYLOAD_BYTES,
    MODELS,
    RECENT_APPLIED,
)

T0 = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)

# One valid wire payload per model, exactly as PROTOCOL §2 spells the keys.
VALID: dict[type, dict[str, Any]] = {
    CoinPulse: {
        "machineId": "arcade123",
        "credits": 2,
        "timestamp": "2024-07-01T12:00:00Z",
        "creditId": "cr_0123",
        "expiresAt": "2024-07-01T12:02:00Z",
    },
    Ack: {
        "machineId": "arcade123",
        "creditId": "cr_0123",
        "result": "rejected",
        "reason": "expired",
        "timestamp": "2024-07-01T12:00:01Z",
    },
    GameOver: {
        "machineId": "arcade123",
        "status": "game_over",
        "timestamp": "2024-07-01T12:30:00Z",
        "creditsLeft": 0,
    },
    Status: {
        "machineId": "arcade123",
        "online": True,
        "state": "attract",
        "credits": 3,
        "timestamp": "2024-07-01T12:00:00Z",
        "agentVersion": "1.2.3",
        "appliedCreditIds": ["cr_0122", "cr_0123"],
    },
    CabinetConfig: {
        "machineId": "arcade123",
        "payUrl": "https://pay.example.com/pay/arcade123",
        "price": {"amount": 100, "currency": "usd"},
        "creditsPerPurchase": 1,
        "name": "Pac-Man",
    },
}
REQUIRED: dict[type, list[str]] = {
    CoinPulse: ["machineId", "credits", "timestamp", "creditId", "expiresAt"],
    Ack: ["machineId", "creditId", "result", "timestamp"],
    GameOver: ["machineId", "status", "timestamp"],
    Status: ["machineId", "online"],
    CabinetConfig: ["machineId", "payUrl", "price", "creditsPerPurchase", "name"],
}
ALL_MODELS = list(VALID)


def _payload(model: type, **changes: Any) -> bytes:
    body = {**VALID[model], **changes}
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


_DROP = object()


def _rejects(model: type, payload: bytes | str) -> str:
    with pytest.raises(ProtocolError) as caught:
        parse_message(model, payload)
    reason = caught.value.reason
    assert reason
    assert "\n" not in reason
    return reason


# --- seed compatibility -------------------------------------------------------------------


def test_coinpulse_keeps_the_prototype_keys_and_their_meaning():
    """A prototype cabinet reading only machineId/credits/timestamp gets the same meaning."""
    pulse = CoinPulse(
        machine_id="arcade123",
        credits=3,
        timestamp=T0,
        credit_id="cr_1",
        expires_at=T0 + timedelta(minutes=2),
    )
    wire = json.loads(dump_message(pulse))
    # What the prototype read: the cabinet id, an integer credit count, an RFC 3339 UTC time.
    assert wire["machineId"] == "arcade123"
    assert wire["credits"] == 3
    assert type(wire["credits"]) is int
    assert datetime.fromisoformat(wire["timestamp"]) == T0
    assert wire["timestamp"].endswith("Z")
    # The additions.
    assert wire["creditId"] == "cr_1"
    assert datetime.fromisoformat(wire["expiresAt"]) == T0 + timedelta(minutes=2)
    assert set(wire) == {"machineId", "credits", "timestamp", "creditId", "expiresAt"}


def test_prototype_gameover_payload_is_accepted():
    """The prototype's game-over message parses unchanged."""
    seed = b'{"machineId": "arcade123", "status": "game_over", "timestamp": "2024-07-01T12:30:00Z"}'
    message = parse_message(GameOver, seed)
    assert message.machine_id == "arcade123"
    assert message.timestamp == datetime(2024, 7, 1, 12, 30, tzinfo=UTC)
    assert message.credits_left is None


def test_timestamps_are_written_in_utc_with_z():
    """Aware times in any zone go out as RFC 3339 UTC with `Z`, to the millisecond."""
    moment = datetime(2024, 7, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(moment) == "2024-07-01T12:00:00.123Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(datetime(2024, 7, 1, 12, 0))


# --- shape ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_valid_payloads_parse_and_dump_back_in_camel_case(model):
    """Each model accepts its PROTOCOL payload and writes the same camelCase keys back."""
    message = parse_message(model, _payload(model))
    wire = json.loads(dump_message(message))
    assert set(wire) == set(VALID[model])
    assert all("_" not in key for key in wire)
    assert parse_message(model, dump_message(message)) == message


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_unknown_keys_are_ignored(model):
    """Forward compatibility: extra keys, even nested objects, do not change the result."""
    plain = parse_message(model, _payload(model))
    extended = parse_message(
        model, _payload(model, futureKey={"nested": [1, 2]}, anotherOne="x", **{"": None})
    )
    assert extended == plain


@pytest.mark.parametrize(
    ("model", "key"),
    [(model, key) for model, keys in REQUIRED.items() for key in keys],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_missing_required_key_is_rejected_naming_it(model, key):
    """Removing any required key is refused and the reason names that key."""
    reason = _rejects(model, _payload(model, **{key: _DROP}))
    assert key in reason


@pytest.mark.parametrize(
    ("model", "key"),
    [
        (Ack, "reason"),
        (GameOver, "creditsLeft"),
        (Status, "agentVersion"),
        (Status, "appliedCreditIds"),
    ],
)
def test_optional_keys_may_be_left_out(model, key):
    """Keys marked optional (`?` in PROTOCOL) may be absent."""
    assert parse_message(model, _payload(model, **{key: _DROP}))


WRONG_TYPES = [
    (CoinPulse, "credits", "2"),
    (CoinPulse, "credits", 2.0),
    (CoinPulse, "credits", 2.5),
    (CoinPulse, "credits", True),
    (CoinPulse, "credits", None),
    (CoinPulse, "credits", 0),
    (CoinPulse, "credits", -1),
    (CoinPulse, "credits", MAX_CREDITS_PER_GRANT + 1),
    (CoinPulse, "timestamp", "2024-07-01T12:00:00"),  # naive
    (CoinPulse, "timestamp", 1719835200),
    (CoinPulse, "timestamp", "yesterday"),
    (CoinPulse, "expiresAt", "2024-07-01T12:02:00"),  # naive
    (CoinPulse, "creditId", 123),
    (CoinPulse, "creditId", ""),
    (CoinPulse, "creditId", "x" * 129),
    (CoinPulse, "machineId", 123),
    (CoinPulse, "machineId", "a/b"),
    (CoinPulse, "machineId", "+"),
    (CoinPulse, "machineId", ""),
    (CoinPulse, "machineId", "a" * 65),
    (Ack, "result", "ok"),
    (Ack, "result", True),
    (Ack, "result", "APPLIED"),
    (Ack, "reason", 5),
    (Ack, "reason", "x" * 501),
    (Ack, "timestamp", "2024-07-01T12:00:01"),  # naive
    (Ack, "creditId", ["cr_0123"]),
    (GameOver, "status", "over"),
    (GameOver, "status", "GAME_OVER"),
    (GameOver, "creditsLeft", -1),
    (GameOver, "creditsLeft", "0"),
    (GameOver, "creditsLeft", 1.0),
    (GameOver, "timestamp", "2024-07-01T12:30:00"),  # naive
    (Status, "online", 1),
    (Status, "online", "true"),
    (Status, "online", None),
    (Status, "state", "busy"),
    (Status, "credits", "3"),
    (Status, "credits", 3.0),
    (Status, "credits", -1),
    (Status, "credits", False),
    (Status, "timestamp", "2024-07-01T12:00:00"),  # naive
    (Status, "agentVersion", 1),
    (Status, "agentVersion", "v" * 65),
    (Status, "appliedCreditIds", "cr_0123"),
    (Status, "appliedCreditIds", ["a/b"]),
    (Status, "appliedCreditIds", [1]),
    (Status, "appliedCreditIds", [f"cr_{i}" for i in range(RECENT_APPLIED + 1)]),
    (CabinetConfig, "price", {"amount": "100", "currency": "usd"}),
    (CabinetConfig, "price", {"amount": 1.5, "currency": "usd"}),
    (CabinetConfig, "price", {"amount": -1, "currency": "usd"}),
    (CabinetConfig, "price", {"amount": 100, "currency": "USD"}),
    (CabinetConfig, "price", {"amount": 100, "currency": "dollars"}),
    (CabinetConfig, "price", {"amount": 100}),
    (CabinetConfig, "price", 100),
    (CabinetConfig, "creditsPerPurchase", 0),
    (CabinetConfig, "creditsPerPurchase", "1"),
    (CabinetConfig, "payUrl", ""),
    (CabinetConfig, "name", None),
]


@pytest.mark.parametrize(
    ("model", "key", "value"),
    WRONG_TYPES,
    ids=[f"{m.__name__}-{k}-{v!r}"[:60] for m, k, v in WRONG_TYPES],
)
def test_wrong_types_and_out_of_range_values_are_rejected(model, key, value):
    """Strict models: no string-for-int, 1-for-bool, float credits or naive timestamps."""
    reason = _rejects(model, _payload(model, **{key: value}))
    assert key in reason


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "payload", [b"[]", b"[{}]", b"1", b"1.5", b'"text"', b"null", b"true"], ids=bytes.decode
)
def test_json_that_is_not_an_object_is_rejected(model, payload):
    """Arrays, numbers, strings, null and booleans are not messages."""
    assert _rejects(model, payload) == "payload is not a JSON object"


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"{'machineId': 'a'}", b'{"machineId": "a",}', b"\x00\x01\x02"],
    ids=repr,
)
def test_invalid_json_is_rejected(model, payload):
    """Text that is not JSON is refused as such."""
    assert _rejects(model, payload) == "payload is not valid JSON"


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_trailing_data_is_rejected(model):
    """A valid message followed by more JSON is refused (the first object is checked
    first, so the reason may name a key it lacks)."""
    _rejects(model, _payload(model) + b" {}")
    _rejects(model, b"{} {}")


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe\xfd", b'{"machineId": "arc\xe9ade"}', b'{"machineId": "\xc3"}', "\ud800"],
    ids=repr,
)
def test_invalid_utf8_is_rejected(model, payload):
    """Bytes that are not UTF-8 (and lone surrogates in text) never reach a model."""
    _rejects(model, payload)


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_oversized_payloads_are_rejected_before_parsing(model):
    """A payload over MAX_PAYLOAD_BYTES is refused, even though it is otherwise valid."""
    base = _payload(model)
    padding = "x" * (MAX_PAYLOAD_BYTES - len(base) - len(b', "pad": ""'))
    at_limit = _payload(model, pad=padding)
    assert len(at_limit) == MAX_PAYLOAD_BYTES
    assert parse_message(model, at_limit) == parse_message(model, base)
    over = _payload(model, pad=padding + "x")
    assert "exceeds" in _rejects(model, over)
    assert "exceeds" in _rejects(model, b" " * (20 * 1024))


def test_oversized_text_payload_is_measured_in_bytes():
    """A str payload is limited by its UTF-8 size like bytes are (6,000 '€' = 18,000 bytes)."""
    payload = json.dumps({**VALID[Status], "pad": "€" * 6000}, ensure_ascii=False)
    assert len(payload.encode()) > MAX_PAYLOAD_BYTES
    _rejects(Status, payload)


# --- status and the Last Will -------------------------------------------------------------


def test_last_will_status_is_accepted():
    """The Will `{machineId, online:false}` is a complete status on its own."""
    will = parse_message(Status, b'{"machineId": "arcade123", "online": false}')
    assert will.online is False
    assert (will.state, will.credits, will.timestamp) == (None, None, None)
    assert json.loads(dump_message(will)) == {"machineId": "arcade123", "online": False}


@pytest.mark.parametrize("key", ["state", "credits", "timestamp"])
def test_online_status_needs_state_credits_and_timestamp(key):
    """`online:true` without state, credits or timestamp is refused."""
    reason = _rejects(Status, _payload(Status, **{key: _DROP}))
    assert "online status needs" in reason


def test_offline_status_may_carry_details():
    """A clean `online:false` from a shutting-down agent may still say its state and credits."""
    status = parse_message(Status, _payload(Status, online=False, state="out_of_service"))
    assert status.online is False
    assert status.state == "out_of_service"


@pytest.mark.parametrize("state", ["attract", "playing", "out_of_service"])
def test_every_documented_state_is_accepted(state):
    """The three states of PROTOCOL §2 are valid."""
    assert parse_message(Status, _payload(Status, state=state)).state == state


def test_models_are_frozen():
    """A parsed message cannot be changed after validation."""
    ack = parse_message(Ack, _payload(Ack))
    with pytest.raises(AttributeError, match="immutable"):
        ack.result = "applied"  # type: ignore[misc]
    assert Price(amount=1, currency="usd").amount == 1


def test_snake_case_keys_are_not_protocol_keys():
    """`machine_id` is an unknown key (ignored), so a payload lacking `machineId` is refused."""
    _rejects(Status, b'{"machine_id": "arcade123", "online": false}')


@pytest.mark.parametrize(
    ("model", "key"), [(Ack, "creditId"), (Ack, "reason"), (Status, "agentVersion")]
)
def test_nul_characters_in_strings_are_rejected(model, key):
    """Strings stored by the server cannot carry NUL, which PostgreSQL text cannot hold."""
    _rejects(model, _payload(model, **{key: "cr_\u0000x"}))


# --- properties ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["2024-07-01T12:00:00Z", "attract", "applied", "game_over", "arcade123"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
known_keys = st.sampled_from(sorted({key for payload in VALID.values() for key in payload}))


def _check_or_protocol_error(model: type, payload: bytes) -> None:
    try:
        message = parse_message(model, payload)
    except ProtocolError as exc:
        reason = exc.reason
    else:
        assert isinstance(message, model)
        assert parse_message(model, dump_message(message)) == message
        return
    assert reason


@settings(max_examples=100)
@given(value=json_values, model=st.sampled_from(ALL_MODELS))
def test_any_json_value_yields_a_message_or_protocol_error(value, model):
    """Whatever JSON arrives, parsing returns a valid message or raises ProtocolError only."""
    _check_or_protocol_error(model, json.dumps(value).encode())


@settings(max_examples=150)
@given(
    model=st.sampled_from(ALL_MODELS),
    changes=st.dictionaries(known_keys | st.text(max_size=8), json_values, max_size=4),
    dropped=st.sets(known_keys, max_size=3),
)
def test_mutated_valid_payloads_yield_a_message_or_protocol_error(model, changes, dropped):
    """Valid payloads with keys replaced by garbage or removed never raise anything else."""
    body = {k: v for k, v in {**VALID[model], **changes}.items() if k not in dropped}
    _check_or_protocol_error(model, json.dumps(body).encode())


@settings(max_examples=100)
@given(payload=st.binary(max_size=64), model=st.sampled_from(ALL_MODELS))
def test_any_bytes_yield_a_message_or_protocol_error(payload, model):
    """Binary garbage is refused with a ProtocolError, never another exception."""
    _check_or_protocol_error(model, payload)


aware_times = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone.min]),
).map(lambda moment: moment.replace(microsecond=moment.microsecond // 1000 * 1000))
ids = st.from_regex(MACHINE_ID_PATTERN, fullmatch=True)


def _build(model: type) -> Any:
    # Pydantic signatures use the camelCase aliases; build by field name instead.
    def build(**fields: Any) -> Any:
        return model(**fields)

    return build


@given(
    st.builds(
        _build(CoinPulse),
        machine_id=ids,
        credits=st.integers(1, MAX_CREDITS_PER_GRANT),
        timestamp=aware_times,
        credit_id=st.from_regex(CREDIT_ID_PATTERN, fullmatch=True),
        expires_at=aware_times,
    )
    | st.builds(
        _build(Ack),
        machine_id=ids,
        credit_id=st.from_regex(CREDIT_ID_PATTERN, fullmatch=True),
        result=st.sampled_from(["applied", "rejected"]),
        reason=st.none()
        | st.from_regex(TEXT_PATTERN, fullmatch=True).filter(lambda t: len(t) <= 500),
        timestamp=aware_times,
    )
    | st.builds(
        _build(GameOver),
        machine_id=ids,
        status=st.just("game_over"),
        timestamp=aware_times,
        credits_left=st.none() | st.integers(min_value=0, max_value=MAX_CREDIT_BALANCE),
    )
    | st.builds(
        _build(Status),
        machine_id=ids,
        online=st.just(True),
        state=st.sampled_from(["attract", "playing", "out_of_service"]),
        credits=st.integers(min_value=0, max_value=MAX_CREDIT_BALANCE),
        timestamp=aware_times,
        agent_version=st.none()
        | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64),
    )
)
def test_every_message_survives_dump_and_parse(message):
    """dump_message then parse_message gives back an equal message (same instants)."""
    payload = dump_message(message)
    assert len(payload) <= MAX_PAYLOAD_BYTES
    assert parse_message(type(message), payload) == message


def test_every_topic_kind_has_a_model():
    """Each topic kind maps to its payload model."""
    assert {kind.value: model.__name__ for kind, model in MODELS.items()} == {
        "coinpulse": "CoinPulse",
        "ack": "Ack",
        "gameover": "GameOver",
        "status": "Status",
        "config": "CabinetConfig",
    }
