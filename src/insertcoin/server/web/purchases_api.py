"""Purchases in the operator API: list with filters, detail with history, manual refund."""

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query

from insertcoin.protocol.ids import MACHINE_ID_PATTERN
from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.payments import purchases
from insertcoin.server.web.deps import AdminDep, RuntimeDep

router = APIRouter(prefix="/api", tags=["operator"], dependencies=[AdminDep])

_PURCHASE_ID = r"^pu_[0-9a-f]{24}$"
PurchaseIdPath = Annotated[str, Path(pattern=_PURCHASE_ID)]
PurchaseState = Literal["authorized", "credited", "voided", "refunded", "needs_attention"]


@router.get("/purchases", summary="Purchases, newest first")
def list_purchases(
    runtime: RuntimeDep,
    machine_id: Annotated[str | None, Query(alias="machineId", pattern=MACHINE_ID_PATTERN)] = None,
    state: PurchaseState | None = None,
    since: datetime | None = None,
    before: Annotated[str | None, Query(pattern=_PURCHASE_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[dict[str, Any]]:
    """Filter by cabinet, state and creation time (`since`, RFC 3339); page with
    `before=<id of the last purchase of the previous page>`."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=utc_now().tzinfo)
    with runtime.db.read() as conn:
        return purchases.find(
            conn, machine_id=machine_id, state=state, since=since, before=before, limit=limit
        )


@router.get("/purchases/{purchase_id}", summary="A purchase with its full history")
def get_purchase(purchase_id: PurchaseIdPath, runtime: RuntimeDep) -> dict[str, Any]:
    with runtime.db.read() as conn:
        return purchases.get(conn, purchase_id)


@router.post("/purchases/{purchase_id}/refund", status_code=202, summary="Refund (idempotent)")
def refund_purchase(purchase_id: PurchaseIdPath, runtime: RuntimeDep) -> dict[str, Any]:
    """Gives the player their money back: cancels an uncaptured authorization or refunds
    a captured payment. Asking again changes nothing; the purchase ends `voided` or
    `refunded` once Stripe confirmed."""
    with runtime.db.write() as conn:
        purchases.request_refund(conn, purchase_id, utc_now())
    runtime.payments.settlement.wake()
    with runtime.db.read() as conn:
        return purchases.get(conn, purchase_id)
