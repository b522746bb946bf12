"""`/_control` (only with `control=True`): the test-side handles of a stand-in running in
another process — faults, webhook pause/drop/resend, paying and settling without a browser,
the delivery log, the test clock. Each route is one `StandIn` method."""

from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from insertcoin.server.payments.standin.errors import CheckoutError, StripeError
from insertcoin.server.payments.standin.faults import When

if TYPE_CHECKING:
    from insertcoin.server.payments.standin import StandIn


class FaultSpec(BaseModel):
    method: str
    path: str
    status: int = Field(500, ge=400, le=599)
    count: int = Field(1, ge=1)
    when: When = "before"
    delay: float = Field(0.0, ge=0)


class WebhookControl(BaseModel):
    paused: bool | None = None
    drop_next: int | None = Field(None, ge=0)


class Payment(BaseModel):
    card: str = "4242 4242 4242 4242"
    quantity: int | None = None
    method: Literal["card", "bank_transfer"] = "card"


class Settlement(BaseModel):
    succeed: bool = True


class Clock(BaseModel):
    advance: float = Field(gt=0)


def router(standin: "StandIn") -> APIRouter:
    router = APIRouter(prefix="/_control")

    @router.post("/faults")
    def add_fault(spec: FaultSpec) -> dict[str, bool]:
        standin.faults.add(**spec.model_dump())
        return {"ok": True}

    @router.post("/webhooks")
    def control_webhooks(control: WebhookControl) -> dict[str, bool]:
        if control.paused is not None:
            standin.pause_webhooks(control.paused)
        if control.drop_next is not None:
            standin.drop_next_webhooks(control.drop_next)
        return {"ok": True}

    @router.post("/sessions/{session_id}/pay")
    def pay(session_id: str, payment: Payment) -> dict[str, Any]:
        try:
            return standin.pay(session_id, **payment.model_dump())
        except CheckoutError as error:
            raise HTTPException(error.status, error.message) from None

    @router.post("/sessions/{session_id}/settle_async")
    def settle(session_id: str, settlement: Settlement) -> dict[str, Any]:
        try:
            return standin.settle_async(session_id, settlement.succeed)
        except CheckoutError as error:
            raise HTTPException(error.status, error.message) from None

    @router.get("/deliveries")
    def deliveries() -> list[dict[str, Any]]:
        return standin.deliveries()

    # GET as well: a "resend" button is one click in a browser.
    @router.api_route("/events/{event_id}/resend", methods=["GET", "POST"])
    def resend(event_id: str) -> dict[str, bool]:
        try:
            standin.resend(event_id)
        except StripeError as error:
            raise HTTPException(error.status, error.message) from None
        return {"ok": True}

    @router.post("/clock")
    def advance_clock(clock: Clock) -> dict[str, bool]:
        standin.advance_clock(clock.advance)
        return {"ok": True}

    return router
