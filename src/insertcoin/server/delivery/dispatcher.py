"""Publishes what the database says is owed: due grants as `coinpulse`, and retained
`config` for cabinets whose config changed or whose broker may have forgotten it.

Runs every `dispatch_interval_seconds`, or at once when woken. Safe with several server
processes: rows are claimed with SKIP LOCKED and rescheduled in the same transaction.
"""

import threading
from collections.abc import Callable

import structlog
from sqlalchemy import select, update

from insertcoin.protocol.messages import CabinetConfig, CoinPulse, dump_message
from insertcoin.protocol.timestamps import utc_now
from insertcoin.protocol.topics import TopicKind, Topics
from insertcoin.server.delivery import grants
from insertcoin.server.delivery.mqtt import MqttLink
from insertcoin.server.periodic import Periodic
from insertcoin.server.store.database import Database
from insertcoin.server.store.tables import cabinets

log = structlog.get_logger(__name__)

# Small enough that one claim commits quickly (a crash rolls back at most this much).
_BATCH = 100


class Dispatcher:
    def __init__(
        self,
        db: Database,
        link: MqttLink,
        topics: Topics,
        *,
        schedule: grants.Schedule,
        interval: float,
        config_of: Callable[..., CabinetConfig],
        follower: grants.GrantFollower,
    ) -> None:
        self._db = db
        self._link = link
        self._topics = topics
        self._schedule = schedule
        self._interval = interval
        self._config_of = config_of
        self._follower = follower
        self._republish_configs = threading.Event()
        self._worker = Periodic(
            "dispatcher", interval, lambda: self.run_once(connected=self._link.connected)
        )

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def wake(self) -> None:
        self._worker.wake()

    def broker_connected(self) -> None:
        """A (re)connected broker may have lost retained configs: publish them all again."""
        self._republish_configs.set()
        self.wake()

    def send(self, pulse: CoinPulse) -> None:
        topic = self._topics.topic(pulse.machine_id, TopicKind.COINPULSE)
        if self._link.publish(topic, dump_message(pulse)):
            log.debug("coinpulse_sent", machineId=pulse.machine_id, creditId=pulse.credit_id)

    def _claim(self, *, sending: bool) -> int:
        sent = 0
        while True:
            owed = 0
            with self._db.write() as conn:
                now = utc_now()
                claim = grants.claim_due(
                    conn, now, self._schedule, _BATCH, only_expired=not sending
                )
                if claim.expired:
                    owed = self._follower.follow(conn, [c for _, c in claim.expired], now)
            if owed:
                self._follower.committed()
            for machine_id, credit_id in claim.expired:
                log.info("grant_expired", machineId=machine_id, creditId=credit_id)
            for pulse in claim.pulses:
                self.send(pulse)
            sent += len(claim.pulses)
            if len(claim.pulses) + len(claim.expired) < _BATCH:
                return sent

    def run_once(self, *, connected: bool = True) -> int:
        """One pass; returns how many messages were published. Without a broker, grants
        still expire on time (nothing is owed past its grace), and nothing is sent."""
        sent = 0
        if not connected:
            self._claim(sending=False)
            return sent
        if self._republish_configs.is_set():
            self._republish_configs.clear()
            with self._db.write() as conn:
                conn.execute(update(cabinets).values(config_published_version=0))
        sent += self._claim(sending=True)
        while True:
            with self._db.write() as conn:
                rows = (
                    conn.execute(
                        select(cabinets)
                        .where(cabinets.c.config_published_version < cabinets.c.config_version)
                        .limit(_BATCH)
                        .with_for_update(skip_locked=True)
                    )
                    .mappings()
                    .all()
                )
                for row in rows:
                    conn.execute(
                        update(cabinets)
                        .where(cabinets.c.machine_id == row["machine_id"])
                        .values(config_published_version=row["config_version"])
                    )
            for row in rows:
                topic = self._topics.topic(row["machine_id"], TopicKind.CONFIG)
                self._link.publish(topic, dump_message(self._config_of(row)), retain=True)
            sent += len(rows)
            if len(rows) < _BATCH:
                break
        return sent
