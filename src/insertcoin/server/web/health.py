"""`GET /status` (seed-compatible, with real checks) and `GET /metrics`."""

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from insertcoin import __version__
from insertcoin.server.web.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/status")
def status(runtime: RuntimeDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        runtime.db.check()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    checks["broker"] = "ok" if runtime.link.connected else "disconnected"
    healthy = all(value == "ok" for value in checks.values())
    body = {
        "status": "up" if healthy else "degraded",
        "message": "API is running" if healthy else "API is running with failed checks",
        "checks": checks,
        "payments": runtime.payments.mode,
        "version": __version__,
    }
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/metrics")
def metrics(runtime: RuntimeDep) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415

    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
