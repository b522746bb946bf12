"""Pay links: the QR images of a cabinet's pay URL, and the seed-compatible
`POST /create-payment-link`. The pay URL (`{public URL}/pay/{machineId}`) is stable, so
nothing is created per call; everything here is public (it shows only that URL)."""

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from insertcoin.protocol.ids import MACHINE_ID_PATTERN
from insertcoin.server.web.deps import MachineIdPath, RuntimeDep

router = APIRouter(tags=["pay links"])

MAX_QUANTITY = 100
CACHE_CONTROL = {"Cache-Control": "public, max-age=3600"}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such cabinet"}}


class PaymentLinkRequest(BaseModel):
    # Unknown keys are ignored, as the prototype did; known ones are checked strictly.
    model_config = ConfigDict(extra="ignore", strict=True)

    machine_id: Annotated[str, Field(pattern=MACHINE_ID_PATTERN)]
    quantity: Annotated[int, Field(ge=1, le=MAX_QUANTITY)] | None = None


class PaymentLink(BaseModel):
    url: str
    qr_svg: str
    qr_png: str
    machine_id: Annotated[str, Field(serialization_alias="machineId")]


@router.get(
    "/cabinets/{machine_id}/qr.svg",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}}, **_NOT_FOUND},
)
def qr_svg(machine_id: MachineIdPath, runtime: RuntimeDep) -> Response:
    """The QR code of the cabinet's pay URL, as SVG."""
    from insertcoin.server.cabinets import qr  # noqa: PLC0415  (segno only when needed)

    cabinet = runtime.registry.get(machine_id)
    return Response(qr.qr_svg(cabinet.pay_url), media_type="image/svg+xml", headers=CACHE_CONTROL)


@router.get(
    "/cabinets/{machine_id}/qr.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_NOT_FOUND},
)
def qr_png(
    machine_id: MachineIdPath,
    runtime: RuntimeDep,
    scale: Annotated[int, Query(ge=1, le=40, description="Pixels per module.")] = 10,
) -> Response:
    """The QR code of the cabinet's pay URL, as PNG."""
    from insertcoin.server.cabinets import qr  # noqa: PLC0415  (segno only when needed)

    cabinet = runtime.registry.get(machine_id)
    return Response(
        qr.qr_png(cabinet.pay_url, scale), media_type="image/png", headers=CACHE_CONTROL
    )


@router.post(
    "/create-payment-link",
    response_model=PaymentLink,
    response_model_by_alias=True,
    responses=_NOT_FOUND,
)
def create_payment_link(body: PaymentLinkRequest, runtime: RuntimeDep) -> PaymentLink:
    """Seed-compatible: the cabinet's pay URL and its QR images. Creates nothing.

    `quantity` (1..100, and at most the cabinet's `maxQuantity`) is passed on to the pay
    page as `?quantity=N`."""
    cabinet = runtime.registry.get(body.machine_id)
    url = cabinet.pay_url
    if body.quantity is not None:
        if body.quantity > cabinet.max_quantity:
            raise HTTPException(
                422,
                f"quantity {body.quantity} is more than cabinet {cabinet.machine_id!r} sells "
                f"in one purchase (maxQuantity {cabinet.max_quantity})",
            )
        url = f"{url}?quantity={body.quantity}"
    images = f"{runtime.settings.public_url}/cabinets/{cabinet.machine_id}"
    return PaymentLink(
        url=url,
        qr_svg=f"{images}/qr.svg",
        qr_png=f"{images}/qr.png",
        machine_id=cabinet.machine_id,
    )
