"""Prometheus metrics. Counts that must agree across server processes (grants by state,
cabinets online) are read from the database at scrape time. Latencies are per process,
except under `serve --workers N`: there the workers share them (see `Metrics`)."""

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from insertcoin.server.store.database import Database
from insertcoin.server.store.tables import grants, presence, purchases

GRANT_STATES = ("pending", "applied", "rejected", "expired")
PURCHASE_STATES = ("authorized", "credited", "voided", "refunded", "needs_attention")


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
        yield from self._purchases()

    def _purchases(self) -> Iterator[GaugeMetricFamily]:
        with self._db.read() as conn:
            by_state: dict[str, int] = dict(
                conn.execute(
                    select(purchases.c.state, func.count()).group_by(purchases.c.state)
                ).all()
            )
            revenue = conn.execute(
                select(purchases.c.currency, func.sum(purchases.c.amount))
                .where(purchases.c.state == "credited")
                .group_by(purchases.c.currency)
            ).all()
            failing = conn.execute(
                select(func.count())
                .select_from(purchases)
                .where(purchases.c.action.is_not(None), purchases.c.action_error.is_not(None))
            ).scalar_one()
        family = GaugeMetricFamily("insertcoin_purchases", "Purchases by state", labels=["state"])
        for state in PURCHASE_STATES:
            family.add_metric([state], by_state.get(state, 0))
        yield family
        money = GaugeMetricFamily(
            "insertcoin_revenue_minor_units",
            "Captured money of credited purchases, in the currency's minor unit (cents)",
            labels=["currency"],
        )
        for currency, total in revenue:
            money.add_metric([currency], total or 0)
        yield money
        yield GaugeMetricFamily(
            "insertcoin_stripe_calls_failing",
            "Purchases whose owed Stripe call (capture/cancel/refund) last failed",
            value=failing,
        )


# prometheus_client's multiprocess mode: set (before it is imported) by `serve --workers`.
SHARED_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DatabaseCollector(db))
        # Workers behind one port: each writes its observations to files in a directory
        # they share, and whichever worker answers a scrape adds them all up (the files
        # of a worker that died stay counted). Alone, a process keeps them in memory.
        shared = os.environ.get(SHARED_DIR_VARIABLE)
        if shared:
            from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

            MultiProcessCollector(self.registry, path=shared)  # type: ignore[no-untyped-call]
        observed = None if shared else self.registry
        self.delivery_seconds = Histogram(
            "insertcoin_grant_delivery_seconds",
            "From grant created to the cabinet's applied ack",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=observed,
        )
        self.webhook_seconds = Histogram(
            "insertcoin_webhook_seconds",
            "Stripe webhook handling, from request to the durable 200",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=observed,
        )
