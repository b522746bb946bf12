"""Routes a cabinet calls with its own bearer token."""

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from insertcoin.protocol.ids import MACHINE_ID_PATTERN
from insertcoin.protocol.messages import MAX_CREDIT_BALANCE, GameOver
from insertcoin.protocol.timestamps import utc_now
from insertcoin.server.delivery.events import CabinetMessage
from insertcoin.server.errors import Forbidden
from insertcoin.server.web.deps import CabinetIdentity, RuntimeDep

router = APIRouter(tags=["cabinet"])


class GameOverBody(BaseModel):
    machine_id: Annotated[str, Field(pattern=MACHINE_ID_PATTERN)]
    credits_left: Annotated[int, Field(ge=0, le=MAX_CREDIT_BALANCE, strict=True)] | None = None


@router.post("/gameover")
def gameover(body: GameOverBody, cabinet: CabinetIdentity, runtime: RuntimeDep) -> dict[str, str]:
    """Seed-compatible: record a game over for the cabinet whose token is presented."""
    if body.machine_id != cabinet:
        raise Forbidden(f"this token belongs to another cabinet, not {body.machine_id!r}")
    message = GameOver(
        machine_id=cabinet,
        status="game_over",
        timestamp=utc_now(),
        credits_left=body.credits_left,
    )
    runtime.events.handle([CabinetMessage(cabinet, message, via="http")])
    return {"status": "ok", "message": "Game over recorded", "machine_id": cabinet}
