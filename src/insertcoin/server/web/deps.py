"""Typed dependencies shared by the routes."""

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from insertcoin.protocol.ids import CREDIT_ID_PATTERN, MACHINE_ID_PATTERN
from insertcoin.server.errors import Unauthorized
from insertcoin.server.runtime import Runtime

_bearer = HTTPBearer(auto_error=False)


# No I/O in these: `async def` keeps them off the thread pool.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
MachineIdPath = Annotated[str, Path(pattern=MACHINE_ID_PATTERN)]
CreditIdPath = Annotated[str, Path(pattern=CREDIT_ID_PATTERN)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def require_admin(runtime: RuntimeDep, bearer: BearerDep) -> None:
    if bearer is None:
        raise Unauthorized("send the admin token as 'Authorization: Bearer <token>'")
    if runtime.admin is None or not runtime.admin.verify(bearer.credentials):
        raise Unauthorized("wrong admin token")


def authenticated_cabinet(runtime: RuntimeDep, bearer: BearerDep) -> str:
    """The machineId whose token was presented."""
    if bearer is None:
        raise Unauthorized("send the cabinet token as 'Authorization: Bearer <token>'")
    machine_id = runtime.registry.authenticate(bearer.credentials)
    if machine_id is None:
        raise Unauthorized("unknown cabinet token")
    return machine_id


AdminDep = Depends(require_admin)
CabinetIdentity = Annotated[str, Depends(authenticated_cabinet)]
