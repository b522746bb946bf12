"""Issuing grants: commit the grant, then publish it at once (the dispatcher re-sends it
if that publish is lost, or if this process dies between the two)."""

from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta

import structlog
from sqlalchemy import Connection

from insertcoin.protocol.messages import CoinPulse
from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.delivery import grants
from insertcoin.server.settings import Settings
from insertcoin.server.store.database import Database
from insertcoin.server.store.group_commit import GroupCommit

log = structlog.get_logger(__name__)


def schedule_of(settings: Settings) -> grants.Schedule:
    return grants.Schedule(
        ttl=timedelta(seconds=settings.credit_ttl_seconds),
        initial=settings.retry_initial_seconds,
        maximum=settings.retry_max_seconds,
        grace=timedelta(seconds=settings.credit_grace_seconds),
    )


class DeliveryService:
    def __init__(
        self, db: Database, schedule: grants.Schedule, send: Callable[[CoinPulse], None]
    ) -> None:
        self._send = send
        self.schedule = schedule
        self._writer: GroupCommit[grants.GrantRequest, CoinPulse] = GroupCommit(
            db,
            "grant_writer",
            lambda conn, requests: grants.create_many(
                conn, requests, now=utc_now(), schedule=self.schedule
            ),
            after=self.send,
        )

    def start(self) -> None:
        self._writer.start()

    def stop(self) -> None:
        self._writer.stop()

    def create(self, conn: Connection, request: grants.GrantRequest) -> CoinPulse:
        """Add one grant inside the caller's transaction; call `send` after it commits."""
        [result] = grants.create_many(conn, [request], now=utc_now(), schedule=self.schedule)
        if not isinstance(result, CoinPulse):
            raise result
        return result

    def send(self, pulse: CoinPulse) -> None:
        """Publish a committed grant and log its creation (logged only once durable)."""
        log.info(
            "grant_created",
            machineId=pulse.machine_id,
            creditId=pulse.credit_id,
            credits=pulse.credits,
        )
        self._send(pulse)

    def comp(self, machine_id: str, credits: int, reason: str) -> "Future[CoinPulse]":
        """A free grant from the operator, written and published by the group writer."""
        return self._writer.submit(grants.GrantRequest(machine_id, credits, grants.COMP, reason))
