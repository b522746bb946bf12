"""Stripe's webhook: `POST /addCredit` (the prototype's path) and `/webhooks/stripe`.

Verify the signature on the raw body, store the event durably, answer 200; the purchase
and its grant are recorded right after, from a fresh read of the session (Stripe's
advice: answer fast, then do the work)."""

import asyncio
import time

import structlog
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from insertcoin.server.payments.gateway import BadSignature
from insertcoin.server.payments.webhook import BadEvent, Ignored, parse
from insertcoin.server.web.deps import RuntimeDep

log = structlog.get_logger(__name__)

router = APIRouter(tags=["stripe"])


async def _webhook(
    request: Request, runtime: RuntimeDep, stripe_signature: str | None
) -> JSONResponse:
    started = time.perf_counter()
    payload = await request.body()
    payments = runtime.payments
    try:
        event = parse(payments.gateway, payload, stripe_signature, payments.webhook_secret)
    except (BadSignature, BadEvent) as exc:
        log.warning("webhook_refused", reason=str(exc))
        return JSONResponse({"detail": str(exc)}, status_code=400)
    if isinstance(event, Ignored):
        return JSONResponse({"received": True, "ignored": event.type})
    _, new = await asyncio.wrap_future(payments.receive(event))
    runtime.metrics.webhook_seconds.observe(time.perf_counter() - started)
    return JSONResponse({"received": True, "duplicate": not new})


@router.post("/addCredit", summary="Stripe webhook (the prototype's path)")
async def add_credit(
    request: Request,
    runtime: RuntimeDep,
    stripe_signature: str | None = Header(default=None),
) -> JSONResponse:
    return await _webhook(request, runtime, stripe_signature)


@router.post("/webhooks/stripe", summary="Stripe webhook")
async def stripe_webhook(
    request: Request,
    runtime: RuntimeDep,
    stripe_signature: str | None = Header(default=None),
) -> JSONResponse:
    return await _webhook(request, runtime, stripe_signature)
