"""Prometheus metrics. Counts that must agree across server processes (grants by state,
cabinets online) are read from the database at scrape time; latencies are per process."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from insertcoin.server.store.database import Database
from insertcoin.server.store.tables import grants, presence

GRANT_STATES = ("pending", "applied", "rejected", "expired")


class _DatabaseCollector(Collector):
    def __init__(self, db: Database) -> None:
        self._db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._db.read() as conn:
            by_state: dict[str, int] = dict(
                conn.execute(select(grants.c.state, func.count()).group_by(grants.c.state)).all()
            )
            online = conn.execute(
                select(func.count()).select_from(presence).where(presence.c.online)
            ).scalar_one()
        family = GaugeMetricFamily("insertcoin_grants", "Credit grants by state", labels=["state"])
        for state in GRANT_STATES:
            family.add_metric([state], by_state.get(state, 0))
        yield family
        yield GaugeMetricFamily(
            "insertcoin_cabinets_online", "Cabinets whose last status said online", value=online
        )


class Metrics:
    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DatabaseCollector(db))
        self.delivery_seconds = Histogram(
            "insertcoin_grant_delivery_seconds",
            "From grant created to the cabinet's applied ack",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
