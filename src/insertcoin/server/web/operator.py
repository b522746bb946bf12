"""The operator API under /api (admin bearer token)."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from insertcoin.protocol import format_timestamp
from insertcoin.protocol.ids import TEXT_PATTERN
from insertcoin.protocol.messages import MAX_CREDITS_PER_GRANT
from insertcoin.server.cabinets.models import Cabinet, CabinetCreate, CabinetPatch, NewCabinet
from insertcoin.server.delivery import grants
from insertcoin.server.web.deps import AdminDep, CreditIdPath, MachineIdPath, RuntimeDep

router = APIRouter(prefix="/api", tags=["operator"], dependencies=[AdminDep])


class CompCredits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    credits: Annotated[int, Field(ge=1, le=MAX_CREDITS_PER_GRANT, strict=True)]
    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=TEXT_PATTERN)]


class GrantCreated(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    credit_id: str
    machine_id: str
    credits: int
    state: str
    expires_at: str


@router.post("/cabinets", status_code=201, response_model=NewCabinet, response_model_by_alias=True)
def create_cabinet(spec: CabinetCreate, runtime: RuntimeDep) -> NewCabinet:
    cabinet = runtime.registry.create(spec)
    runtime.dispatcher.wake()
    return cabinet


@router.get("/cabinets", response_model=list[Cabinet], response_model_by_alias=True)
def list_cabinets(runtime: RuntimeDep) -> list[Cabinet]:
    return runtime.registry.list()


@router.get("/cabinets/{machine_id}", response_model=Cabinet, response_model_by_alias=True)
def get_cabinet(machine_id: MachineIdPath, runtime: RuntimeDep) -> Cabinet:
    return runtime.registry.get(machine_id)


@router.patch("/cabinets/{machine_id}", response_model=Cabinet, response_model_by_alias=True)
def patch_cabinet(machine_id: MachineIdPath, patch: CabinetPatch, runtime: RuntimeDep) -> Cabinet:
    cabinet = runtime.registry.update(machine_id, patch)
    runtime.dispatcher.wake()
    return cabinet


@router.post("/cabinets/{machine_id}/credits", status_code=201, response_model_by_alias=True)
async def comp_credits(
    machine_id: MachineIdPath, body: CompCredits, runtime: RuntimeDep, response: Response
) -> GrantCreated:
    pulse = await asyncio.wrap_future(runtime.delivery.comp(machine_id, body.credits, body.reason))
    response.headers["Location"] = f"/api/grants/{pulse.credit_id}"
    return GrantCreated(
        credit_id=pulse.credit_id,
        machine_id=machine_id,
        credits=pulse.credits,
        state=grants.PENDING,
        expires_at=format_timestamp(pulse.expires_at),
    )


@router.get("/grants/{credit_id}")
def get_grant(credit_id: CreditIdPath, runtime: RuntimeDep) -> dict[str, Any]:
    with runtime.db.read() as conn:
        return grants.get(conn, credit_id)
