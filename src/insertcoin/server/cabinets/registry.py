"""Adding, changing and looking up cabinets. Every change bumps the cabinet's config
version, and the dispatcher publishes the retained `config` until it catches up."""

from typing import Any

import structlog
from sqlalchemy import Connection, RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError

from insertcoin.protocol.messages import CabinetConfig, Price
from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.cabinets.credentials import mosquitto_hash, new_secret, token_hash
from insertcoin.server.cabinets.models import (
    Cabinet,
    CabinetCreate,
    CabinetPatch,
    CabinetPrice,
    MqttCredentials,
    NewCabinet,
)
from insertcoin.server.errors import Conflict, NotFound
from insertcoin.server.settings import Settings
from insertcoin.server.store import history
from insertcoin.server.store.database import Database
from insertcoin.server.store.tables import cabinets, credentials, presence

log = structlog.get_logger(__name__)

_VIEW = select(
    cabinets,
    presence.c.online,
    presence.c.state,
    presence.c.credits,
    presence.c.last_seen,
).select_from(cabinets.outerjoin(presence))


class CabinetRegistry:
    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings

    def _view(self, row: RowMapping) -> Cabinet:
        return Cabinet(
            machine_id=row["machine_id"],
            name=row["name"],
            enabled=row["enabled"],
            price=CabinetPrice(amount=row["price_amount"], currency=row["price_currency"]),
            credits_per_purchase=row["credits_per_purchase"],
            max_quantity=row["max_quantity"],
            pay_url=self._settings.pay_url(row["machine_id"]),
            online=bool(row["online"]),
            state=row["state"],
            credits=row["credits"],
            last_seen=row["last_seen"],
        )

    def config_message(self, row: RowMapping) -> CabinetConfig:
        return CabinetConfig(
            machine_id=row["machine_id"],
            pay_url=self._settings.pay_url(row["machine_id"]),
            price=Price(amount=row["price_amount"], currency=row["price_currency"]),
            credits_per_purchase=row["credits_per_purchase"],
            name=row["name"],
        )

    def create(self, spec: CabinetCreate) -> NewCabinet:
        password, token = new_secret(), new_secret()
        now = utc_now()
        price = spec.price.to_price()
        try:
            with self._db.write() as conn:
                conn.execute(
                    insert(cabinets).values(
                        machine_id=spec.machine_id,
                        name=spec.name,
                        enabled=True,
                        price_amount=price.amount,
                        price_currency=price.currency,
                        credits_per_purchase=spec.credits_per_purchase,
                        max_quantity=spec.max_quantity,
                        created_at=now,
                        updated_at=now,
                        config_version=1,
                        config_published_version=0,
                    )
                )
                conn.execute(
                    insert(credentials).values(
                        machine_id=spec.machine_id,
                        mqtt_password_hash=mosquitto_hash(password),
                        token_hash=token_hash(token),
                        created_at=now,
                    )
                )
                history.record(
                    conn,
                    subject="cabinet",
                    subject_id=spec.machine_id,
                    machine_id=spec.machine_id,
                    event="created",
                    to_state="enabled",
                    at=now,
                    detail=spec.model_dump(mode="json", by_alias=True),
                )
                cabinet = self._get(conn, spec.machine_id)
        except IntegrityError:
            raise Conflict(f"cabinet {spec.machine_id!r} already exists") from None
        log.info("cabinet_created", machineId=spec.machine_id)
        return NewCabinet(
            **cabinet.model_dump(),
            mqtt=MqttCredentials(username=spec.machine_id, password=password),
            token=token,
        )

    def _get(self, conn: Connection, machine_id: str) -> Cabinet:
        row = conn.execute(_VIEW.where(cabinets.c.machine_id == machine_id)).mappings().first()
        if row is None:
            raise NotFound(f"no cabinet {machine_id!r}")
        return self._view(row)

    def get(self, machine_id: str) -> Cabinet:
        with self._db.read() as conn:
            return self._get(conn, machine_id)

    def list(self) -> list[Cabinet]:
        with self._db.read() as conn:
            rows = conn.execute(_VIEW.order_by(cabinets.c.machine_id)).mappings()
            return [self._view(row) for row in rows]

    def update(self, machine_id: str, patch: CabinetPatch) -> Cabinet:
        changes: dict[str, Any] = {}
        if patch.name is not None:
            changes["name"] = patch.name
        if patch.price is not None:
            price = patch.price.to_price()
            changes["price_amount"], changes["price_currency"] = price.amount, price.currency
        if patch.credits_per_purchase is not None:
            changes["credits_per_purchase"] = patch.credits_per_purchase
        if patch.max_quantity is not None:
            changes["max_quantity"] = patch.max_quantity
        if patch.enabled is not None:
            changes["enabled"] = patch.enabled
        now = utc_now()
        with self._db.write() as conn:
            before = self._get(conn, machine_id)
            if changes:
                conn.execute(
                    update(cabinets)
                    .where(cabinets.c.machine_id == machine_id)
                    .values(
                        **changes,
                        updated_at=now,
                        config_version=cabinets.c.config_version + 1,
                    )
                )
                history.record(
                    conn,
                    subject="cabinet",
                    subject_id=machine_id,
                    machine_id=machine_id,
                    event="changed",
                    from_state="enabled" if before.enabled else "disabled",
                    to_state="enabled" if changes.get("enabled", before.enabled) else "disabled",
                    at=now,
                    detail=patch.model_dump(mode="json", by_alias=True, exclude_none=True),
                )
            cabinet = self._get(conn, machine_id)
        if changes:
            log.info("cabinet_changed", machineId=machine_id, fields=sorted(changes))
        return cabinet

    def authenticate(self, token: str) -> str | None:
        """The machineId whose HTTP token this is, or None."""
        with self._db.read() as conn:
            return conn.execute(
                select(credentials.c.machine_id).where(
                    credentials.c.token_hash == token_hash(token)
                )
            ).scalar_one_or_none()
