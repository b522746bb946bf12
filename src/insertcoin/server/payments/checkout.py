"""Opening a Checkout Session for a cabinet: only for a cabinet that can play now, with
the price, quantity limit and metadata from the server's own records."""

import secrets
import time
from dataclasses import dataclass

from sqlalchemy import insert, select

from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.payments.gateway import StripeGateway, StripeRefused, StripeUnavailable
from insertcoin.server.settings import Settings
from insertcoin.server.store.database import Database
from insertcoin.server.store.tables import cabinets, checkouts, presence

# Stripe's shortest allowed session life is 30 minutes; a little over, for clock skew.
_SESSION_LIFE = 31 * 60


@dataclass(frozen=True)
class NotPayable:
    """Why no checkout was opened (the player has not been charged)."""

    status: int
    title: str
    reason: str
    name: str | None = None


def _credits_label(credits: int, name: str) -> str:
    return f"{credits} credit{'s' if credits != 1 else ''} on {name}"


def open_checkout(
    db: Database, gateway: StripeGateway, settings: Settings, machine_id: str, quantity: int
) -> str | NotPayable:
    """The URL of a new Checkout Session, or why there is none."""
    with db.read() as conn:
        row = (
            conn.execute(
                select(cabinets, presence.c.online, presence.c.state)
                .select_from(cabinets.outerjoin(presence))
                .where(cabinets.c.machine_id == machine_id)
            )
            .mappings()
            .first()
        )
    if row is None:
        return NotPayable(
            404, "Unknown cabinet", f"There is no cabinet called {machine_id!r} here."
        )
    name = row["name"]
    if not row["enabled"]:
        return NotPayable(409, "Not available", f"{name} is not taking payments.", name)
    if not row["online"]:
        return NotPayable(409, "Cabinet offline", f"{name} is offline right now.", name)
    if row["state"] == "out_of_service":
        return NotPayable(409, "Out of service", f"{name} is out of service.", name)
    maximum = row["max_quantity"]
    quantity = min(max(quantity, 1), maximum)
    item: dict[str, object] = {
        "price_data": {
            "currency": row["price_currency"],
            "unit_amount": row["price_amount"],
            "product_data": {"name": _credits_label(row["credits_per_purchase"], name)},
        },
        "quantity": quantity,
    }
    if maximum > 1:
        item["adjustable_quantity"] = {"enabled": True, "minimum": 1, "maximum": maximum}
    base = f"{settings.public_url}/pay/{machine_id}"
    params = {
        "mode": "payment",
        "line_items": [item],
        "client_reference_id": machine_id,
        "metadata": {"machine_id": machine_id},
        "payment_intent_data": {"metadata": {"machine_id": machine_id}},
        # Authorize now, capture once the cabinet confirms the credits (PROTOCOL §3).
        "payment_method_options": {"card": {"capture_method": "manual"}},
        "success_url": f"{base}/done?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{base}/cancelled",
        "expires_at": int(time.time()) + _SESSION_LIFE,
    }
    try:
        # One key per scan: a retry of this very request cannot open a second session.
        session = gateway.create_checkout_session(
            params, idempotency_key=f"insertcoin-checkout-{machine_id}-{secrets.token_hex(8)}"
        )
    except (StripeUnavailable, StripeRefused):
        return NotPayable(503, "Payments unavailable", "Payments are not working right now.", name)
    with db.write() as conn:
        conn.execute(
            insert(checkouts).values(
                checkout_session_id=session.id,
                machine_id=machine_id,
                unit_amount=row["price_amount"],
                currency=row["price_currency"],
                credits_per_purchase=row["credits_per_purchase"],
                max_quantity=maximum,
                created_at=utc_now(),
            )
        )
    assert session.url is not None
    return session.url
