"""Topics (PROTOCOL §2): `{prefix}/{machineId}/{kind}` built and parsed, and everything
else refused with a ProtocolError that says why."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from insertcoin.protocol import ProtocolError, TopicKind, Topics
from insertcoin.protocol.ids import (
    MACHINE_ID_PATTERN,
    is_machine_id,
    new_credit_id,
    validate_machine_id,
)
from insertcoin.protocol.topics import CABINET_PUBLISHES, DEFAULT_PREFIX, SERVER_PUBLISHES

machine_ids = st.from_regex(MACHINE_ID_PATTERN, fullmatch=True)
kinds = st.sampled_from(list(TopicKind))
# Prefixes of one or more levels, free of wildcards and without a trailing slash.
prefixes = st.lists(
    st.from_regex(r"[A-Za-z0-9_$-]{1,12}", fullmatch=True), min_size=1, max_size=4
).map("/".join)

BAD_IDS = [
    "",
    "a/b",
    "a+b",
    "+",
    "#",
    "a#",
    "a" * 65,
    "a b",
    " a",
    "a\n",
    "a\x00",
    "café",
    "a.b",
    "a:b",
]


def test_default_prefix_builds_the_prototype_topics():
    """With no prefix given, topics are exactly the prototype's `arcade/machine/{id}/...`."""
    topics = Topics()
    assert DEFAULT_PREFIX == "arcade/machine"
    assert topics.topic("arcade123", TopicKind.COINPULSE) == "arcade/machine/arcade123/coinpulse"
    assert topics.topic("arcade123", TopicKind.GAMEOVER) == "arcade/machine/arcade123/gameover"
    assert {k.value for k in TopicKind} == {"coinpulse", "ack", "gameover", "status", "config"}


@given(prefix=prefixes, machine_id=machine_ids, kind=kinds)
def test_build_then_parse_round_trips(prefix, machine_id, kind):
    """Any valid id and kind under any valid prefix parse back to the same (id, kind)."""
    topics = Topics(prefix)
    topic = topics.topic(machine_id, kind)
    assert topic == f"{prefix}/{machine_id}/{kind.value}"
    assert topics.parse(topic) == (machine_id, kind)


def test_wildcard_and_shared_subscriptions():
    """Wildcards match one id level; shared subscriptions use EMQX/MQTT 5 `$share/group/...`."""
    topics = Topics("arcade/machine")
    assert topics.wildcard(TopicKind.ACK) == "arcade/machine/+/ack"
    assert topics.shared(TopicKind.ACK, "insertcoin") == "$share/insertcoin/arcade/machine/+/ack"
    assert topics.shared(TopicKind.STATUS, "fleet") == "$share/fleet/arcade/machine/+/status"


def test_each_side_publishes_its_own_kinds():
    """The server publishes coinpulse/config, cabinets ack/status/gameover; no kind is both."""
    assert {TopicKind.COINPULSE, TopicKind.CONFIG} == SERVER_PUBLISHES
    assert {TopicKind.ACK, TopicKind.STATUS, TopicKind.GAMEOVER} == CABINET_PUBLISHES
    assert set(TopicKind) == SERVER_PUBLISHES | CABINET_PUBLISHES


@pytest.mark.parametrize("bad", BAD_IDS)
def test_building_a_topic_for_a_bad_id_is_refused(bad):
    """An id with `/`, `+`, `#`, spaces, non-ASCII or over 64 characters never becomes a topic."""
    with pytest.raises(ProtocolError, match="invalid machineId"):
        Topics().topic(bad, TopicKind.COINPULSE)


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/machine/a/ack", "is not under"),
        ("arcade/machines/a/ack", "is not under"),
        ("arcade/a/ack", "is not under"),
        ("arcade/machine", "is not under"),
        ("ARCADE/machine/a/ack", "is not under"),
        ("/arcade/machine/a/ack", "is not under"),
        ("arcade/machine/a", "is not arcade/machine/<machineId>/<kind>"),
        ("arcade/machine/a/ack/extra", "is not arcade/machine/<machineId>/<kind>"),
        ("arcade/machine/a/b/ack", "is not arcade/machine/<machineId>/<kind>"),
        ("arcade/machine/a/ack/", "is not arcade/machine/<machineId>/<kind>"),
        ("arcade/machine//ack", "invalid machineId"),
        ("arcade/machine/+/ack", "invalid machineId"),
        ("arcade/machine/#/ack", "invalid machineId"),
        ("arcade/machine/" + "a" * 65 + "/ack", "invalid machineId"),
        ("arcade/machine/a b/ack", "invalid machineId"),
        ("arcade/machine/a/bogus", "unknown topic kind"),
        ("arcade/machine/a/ACK", "unknown topic kind"),
        ("arcade/machine/a/", "unknown topic kind"),
        ("arcade/machine/a/+", "unknown topic kind"),
    ],
)
def test_parse_rejects_topics_outside_the_contract(topic, reason):
    """Wrong prefix, missing or extra levels, bad ids and unknown kinds raise with a reason."""
    with pytest.raises(ProtocolError) as caught:
        Topics().parse(topic)
    assert reason in caught.value.reason


segments = st.sampled_from(
    ["arcade", "machine", "arcade123", "ack", "status", "gameover", "+", "#", "", "bogus"]
) | st.text(max_size=6)
topic_like = st.text(max_size=80) | st.lists(segments, max_size=6).map("/".join)


@given(topic_like)
def test_parse_of_any_text_either_round_trips_or_raises_protocol_error(text):
    """Whatever topic arrives, parse returns an (id, kind) that rebuilds it, or a ProtocolError."""
    topics = Topics()
    try:
        machine_id, kind = topics.parse(text)
    except ProtocolError as exc:
        reason = exc.reason
    else:
        assert is_machine_id(machine_id)
        assert topics.topic(machine_id, kind) == text
        return
    assert reason


@pytest.mark.parametrize("prefix", ["", "a/+/b", "+", "#", "a/#", "arcade/machine/"])
def test_invalid_prefixes_are_refused(prefix):
    """A prefix with wildcards, empty, or with a trailing slash cannot be configured."""
    with pytest.raises(ProtocolError, match="invalid topic prefix"):
        Topics(prefix)


@given(machine_ids)
def test_valid_ids_are_accepted(machine_id):
    """Every id matching `^[A-Za-z0-9_-]{1,64}$` is valid and returned unchanged."""
    assert is_machine_id(machine_id)
    assert validate_machine_id(machine_id) == machine_id


@pytest.mark.parametrize("bad", [*BAD_IDS, None, 123, b"abc", ["a"]])
def test_invalid_ids_are_rejected_with_a_reason(bad):
    """Ids outside the pattern, and non-strings, are refused; the reason shows the rule."""
    assert not is_machine_id(bad)
    with pytest.raises(ProtocolError, match="1-64 characters"):
        validate_machine_id(bad)


def test_credit_ids_are_unique_and_topic_safe():
    """New creditIds are distinct and made only of characters safe in ids and logs."""
    ids = {new_credit_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"cr_[0-9a-f]{32}", credit_id) for credit_id in ids)
