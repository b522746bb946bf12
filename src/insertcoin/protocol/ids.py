import re
import uuid

from insertcoin.protocol.errors import ProtocolError

# Safe inside MQTT topics: no '/', '+' or '#', and short enough for broker ACL patterns.
MACHINE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# What new_credit_id() makes is "cr_" + 32 hex digits; agents may see others' ids too.
CREDIT_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Free text that is stored: no control characters (PostgreSQL refuses NUL outright).
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
_MACHINE_ID = re.compile(MACHINE_ID_PATTERN)


def is_machine_id(value: object) -> bool:
    return isinstance(value, str) and _MACHINE_ID.fullmatch(value) is not None


def validate_machine_id(value: object) -> str:
    if not is_machine_id(value):
        raise ProtocolError(
            f"invalid machineId {value!r}: use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    assert isinstance(value, str)
    return value


def new_credit_id() -> str:
    return f"cr_{uuid.uuid4().hex}"
