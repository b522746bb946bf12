"""What cabinets say: `ack`, `status`, `gameover`. One handler for every transport — the
MQTT listener, `POST /gameover`, and later an HTTP bridge fed by a broker rule."""

from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import bindparam, insert, select

from insertcoin.protocol.errors import ProtocolError
from insertcoin.protocol.messages import Ack, GameOver, Status, parse_message
from insertcoin.protocol.timestamps import utc_now
from insertcoin.protocol.topics import CABINET_PUBLISHES, TopicKind, Topics
from insertcoin.server.cabinets.presence import apply_status
from insertcoin.server.delivery import grants
from insertcoin.server.metrics import Metrics
from insertcoin.server.store.database import Database
from insertcoin.server.store.tables import cabinets, gameovers

log = structlog.get_logger(__name__)

_MODELS: dict[TopicKind, type[Ack | Status | GameOver]] = {
    TopicKind.ACK: Ack,
    TopicKind.STATUS: Status,
    TopicKind.GAMEOVER: GameOver,
}


_SETTLING = frozenset([grants.APPLIED, grants.REJECTED, "applied_late"])
# Recorded as the reason of the applies a status reports (see `_reported_acks`).
REPORTED_IN_STATUS = "reported in the cabinet's status when it came online"

# Built once: a fresh select() costs more to build and hash than to run.
_KNOWN = select(cabinets.c.machine_id).where(
    cabinets.c.machine_id.in_(bindparam("ids", expanding=True))
)


@dataclass(frozen=True)
class CabinetMessage:
    """A validated message, attributed to the cabinet that was allowed to send it."""

    machine_id: str
    message: Ack | Status | GameOver
    via: str = "mqtt"


def decode(topics: Topics, topic: str, payload: bytes) -> CabinetMessage:
    """Parse one MQTT message from a cabinet; ProtocolError says why it is unusable."""
    machine_id, kind = topics.parse(topic)
    if kind not in CABINET_PUBLISHES:
        raise ProtocolError(f"cabinets do not publish {kind.value!r}")
    message = parse_message(_MODELS[kind], payload)
    if message.machine_id != machine_id:
        raise ProtocolError(
            f"machineId {message.machine_id!r} in payload does not match topic {machine_id!r}"
        )
    return CabinetMessage(machine_id, message)


class CabinetEvents:
    def __init__(self, db: Database, metrics: Metrics, follower: grants.GrantFollower) -> None:
        self._db = db
        self._metrics = metrics
        self._follower = follower

    def check(self) -> None:
        """Raise if the database does not answer."""
        self._db.check()

    def handle(self, batch: list[CabinetMessage]) -> list[grants.AckOutcome]:
        """Apply a batch in one transaction, then log what it changed (only once
        committed). Messages from unknown cabinets are logged and ignored."""
        now = utc_now()
        logs: list[tuple[str, dict[str, Any]]] = []
        owed = 0
        reported: set[str] = set()
        with self._db.write() as conn:
            ids = sorted({m.machine_id for m in batch})
            known = set(conn.execute(_KNOWN, {"ids": ids}).scalars())
            acks: list[tuple[str, Ack]] = []
            for item in batch:
                message, fields = item.message, {"machineId": item.machine_id, "via": item.via}
                if item.machine_id not in known:
                    logs.append(("message_ignored", {**fields, "reason": "unknown cabinet"}))
                elif isinstance(message, Ack):
                    acks.append((item.machine_id, message))
                elif isinstance(message, Status):
                    apply_status(conn, message, now)
                    more = _reported_acks(message)
                    acks.extend((item.machine_id, ack) for ack in more)
                    reported.update(ack.credit_id for ack in more)
                    logs.append(
                        (
                            "cabinet_status",
                            {
                                **fields,
                                "online": message.online,
                                "state": message.state,
                                "credits": message.credits,
                            },
                        )
                    )
                else:
                    conn.execute(
                        insert(gameovers).values(
                            machine_id=item.machine_id,
                            via=item.via,
                            credits_left=message.credits_left,
                            reported_at=message.timestamp,
                            received_at=now,
                        )
                    )
                    logs.append(("game_over", {**fields, "creditsLeft": message.credits_left}))
            outcomes = grants.apply_acks(conn, acks, now) if acks else []
            # Only purchases hang on a grant's outcome: comp grants cost no look-up.
            settled = [
                o.credit_id
                for o in outcomes
                if o.event in _SETTLING and o.source == grants.PURCHASE
            ]
            if settled:
                owed = self._follower.follow(conn, settled, now)
        if owed:
            self._follower.committed()
        for event, fields in logs:
            log.info(event, **fields)
        for outcome in outcomes:
            if outcome.credit_id in reported and outcome.event in ("duplicate", "ignored"):
                # The usual case: the cabinet repeats what the server already knows.
                log.debug("reported_apply_known", creditId=outcome.credit_id)
                continue
            self._log_outcome(outcome)
            if outcome.event == grants.APPLIED and outcome.created_at is not None:
                self._metrics.delivery_seconds.observe((now - outcome.created_at).total_seconds())
        return outcomes

    @staticmethod
    def _log_outcome(outcome: grants.AckOutcome) -> None:
        fields = {"machineId": outcome.machine_id, "creditId": outcome.credit_id}
        if outcome.event == "duplicate":
            log.debug("ack_duplicate", **fields)
        elif outcome.event == "ignored":
            log.warning("ack_ignored", **fields, reason=outcome.reason)
        elif outcome.event == "applied_late":
            log.warning("grant_applied_late", **fields)
        else:
            log.info(f"grant_{outcome.event}", **fields, reason=outcome.reason)


def _reported_acks(status: Status) -> list[Ack]:
    """A coming-online status's applied creditIds, as the `applied` acks they stand for.

    Re-sends stop at expiresAt + grace; a cabinet that applied a grant and lost every
    ack until then would otherwise hold credits the server never learns of. Known
    applies are duplicates and change nothing; an expired grant becomes `applied_late`
    (and its purchase `needs_attention`), exactly as a late ack would make it."""
    if not status.online or not status.applied_credit_ids or status.timestamp is None:
        return []
    return [
        Ack(
            machine_id=status.machine_id,
            credit_id=credit_id,
            result="applied",
            reason=REPORTED_IN_STATUS,
            timestamp=status.timestamp,
        )
        for credit_id in status.applied_credit_ids
    ]
