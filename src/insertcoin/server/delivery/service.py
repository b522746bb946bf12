"""Issuing grants: commit the grant, then publish it at once (the dispatcher re-sends it
if that publish is lost, or if this process dies between the two)."""

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Connection

from insertcoin.protocol.messages import CoinPulse
from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.delivery import grants
from insertcoin.server.settings import Settings
from insertcoin.server.store.database import Database


class DeliveryService:
    def __init__(self, db: Database, settings: Settings, send: Callable[[CoinPulse], None]) -> None:
        self._db = db
        self._send = send
        self._ttl = timedelta(seconds=settings.credit_ttl_seconds)
        self.backoff = self.backoff_of(settings)

    @staticmethod
    def backoff_of(settings: Settings) -> grants.Backoff:
        return grants.Backoff(settings.retry_initial_seconds, settings.retry_max_seconds)

    def create(
        self, conn: Connection, machine_id: str, credits: int, source: str, reason: str | None
    ) -> CoinPulse:
        """Add a grant inside the caller's transaction; call `send` after it commits."""
        return grants.create(
            conn,
            machine_id=machine_id,
            credits=credits,
            source=source,
            reason=reason,
            now=utc_now(),
            ttl=self._ttl,
            backoff=self.backoff,
        )

    def send(self, pulse: CoinPulse) -> None:
        self._send(pulse)

    def comp(self, machine_id: str, credits: int, reason: str) -> CoinPulse:
        with self._db.write() as conn:
            pulse = self.create(conn, machine_id, credits, "comp", reason)
        self.send(pulse)
        return pulse
