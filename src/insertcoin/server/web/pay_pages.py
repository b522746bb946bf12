"""The player's pages: `/pay/{machineId}` (the QR target), the success page that follows
the purchase live, and the cancel page. Small, mobile-first, no external assets."""

import html
import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from insertcoin.server.errors import NotFound
from insertcoin.server.payments import purchases
from insertcoin.server.payments.checkout import NotPayable, open_checkout
from insertcoin.server.web.deps import MachineIdPath, RuntimeDep
from insertcoin.server.web.ratelimit import RateLimiter

router = APIRouter(tags=["pay"])

_QUANTITY = re.compile(r"[0-9]{1,3}")
_SESSION_ID = re.compile(r"cs_[A-Za-z0-9_]{1,250}")
SessionIdQuery = Annotated[str, Query(pattern=f"^{_SESSION_ID.pattern}$")]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;min-height:100vh;
align-items:center;justify-content:center;background:#111;color:#eee;text-align:center}
main{max-width:26rem;padding:2rem}h1{font-size:1.6rem}p{font-size:1.15rem;line-height:1.5}
.ok{color:#7ee787}.bad{color:#ffa198}.note{color:#aaa;font-size:1rem}
"""


def _page(title: str, body: str, status: int = 200, script: str = "") -> HTMLResponse:
    document = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main>{script}</body></html>"
    )
    return HTMLResponse(document, status_code=status, headers={"Cache-Control": "no-store"})


def _not_payable(why: NotPayable, headers: dict[str, str] | None = None) -> HTMLResponse:
    page = _page(
        why.title,
        f"<h1>{html.escape(why.title)}</h1><p>{html.escape(why.reason)}</p>"
        "<p class=ok id=charged>You have not been charged.</p>",
        why.status,
    )
    if headers:
        page.headers.update(headers)
    return page


def _limiters(request: Request) -> tuple[RateLimiter, RateLimiter]:
    state = request.app.state
    if not hasattr(state, "pay_limiters"):
        settings = state.runtime.settings
        state.pay_limiters = (
            RateLimiter(settings.pay_rate_per_client),
            RateLimiter(settings.pay_rate_per_cabinet),
        )
    limiters: tuple[RateLimiter, RateLimiter] = state.pay_limiters
    return limiters


@router.get("/pay/{machine_id}", response_class=HTMLResponse, summary="Pay for credits (QR target)")
def pay(
    machine_id: MachineIdPath, request: Request, runtime: RuntimeDep, quantity: str = "1"
) -> Response:
    per_client, per_cabinet = _limiters(request)
    client = request.client.host if request.client else "unknown"
    if not (per_client.allow(client) and per_cabinet.allow(machine_id)):
        return _not_payable(
            NotPayable(429, "Too many tries", "Please wait a minute and scan again."),
            {"Retry-After": "60"},
        )
    wanted = int(quantity) if _QUANTITY.fullmatch(quantity) else 1
    result = open_checkout(
        runtime.db, runtime.payments.gateway, runtime.settings, machine_id, wanted
    )
    if isinstance(result, NotPayable):
        return _not_payable(result)
    return RedirectResponse(result, status_code=303)


def _phase(purchase: dict[str, Any] | None, name: str) -> tuple[str, str]:
    """(phase, message) for the success page."""
    if purchase is None:
        return "waiting", "Waiting for the payment to be confirmed…"
    state, grant = purchase["state"], purchase["grantState"]
    if grant == "applied":
        return "delivered", f"Credits delivered to {name}. Have fun!"
    if state == purchases.REFUNDED:
        return "not_delivered", "Not delivered: your payment was refunded."
    if state == purchases.VOIDED or grant in ("rejected", "expired"):
        return "not_delivered", "Not delivered: you have not been charged."
    if state == purchases.NEEDS_ATTENTION:
        return "attention", "Something needs checking: please ask the staff."
    credits = purchase["credits"]
    plural = "s" if credits != 1 else ""
    return "received", f"Payment received. Sending {credits} credit{plural} to {name}…"


def _status(runtime: RuntimeDep, machine_id: str, session_id: str) -> dict[str, Any]:
    cabinet = runtime.registry.get(machine_id)  # NotFound → 404
    with runtime.db.read() as conn:
        purchase = purchases.of_session(conn, machine_id, session_id)
    phase, message = _phase(purchase, cabinet.name)
    return {"phase": phase, "message": message, "cabinet": cabinet.name}


@router.get("/pay/{machine_id}/status", summary="A purchase's progress, for the success page")
def pay_status(
    machine_id: MachineIdPath, session_id: SessionIdQuery, runtime: RuntimeDep
) -> JSONResponse:
    return JSONResponse(
        _status(runtime, machine_id, session_id), headers={"Cache-Control": "no-store"}
    )


_FOLLOW = """<script>
const url = %s;
const final = ["delivered", "not_delivered", "attention"];
async function poll() {
  try {
    const r = await fetch(url, {cache: "no-store"});
    if (r.ok) {
      const s = await r.json();
      const el = document.getElementById("status");
      el.textContent = s.message; el.dataset.phase = s.phase;
      const busy = s.phase === "received" || s.phase === "waiting";
      el.className = s.phase === "delivered" ? "ok" : busy ? "" : "bad";
      if (final.includes(s.phase)) return;
    }
  } catch (e) {}
  setTimeout(poll, 1000);
}
poll();
</script>"""


@router.get("/pay/{machine_id}/done", response_class=HTMLResponse, summary="After paying")
def pay_done(
    machine_id: MachineIdPath, runtime: RuntimeDep, session_id: str | None = None
) -> Response:
    if session_id is None or not _SESSION_ID.fullmatch(session_id):
        return _not_payable(
            NotPayable(404, "Unknown payment", "This link does not name a payment.")
        )
    try:
        status = _status(runtime, machine_id, session_id)
    except NotFound:
        return _not_payable(
            NotPayable(404, "Unknown cabinet", f"There is no cabinet called {machine_id!r} here.")
        )
    url = f"/pay/{machine_id}/status?session_id={session_id}"
    return _page(
        "Thanks!",
        f"<h1>{html.escape(status['cabinet'])}</h1>"
        f'<p id=status data-phase="{status["phase"]}">{html.escape(status["message"])}</p>'
        "<p class=note>Keep this page open to follow your credits.</p>",
        script=_FOLLOW % json.dumps(url),
    )


@router.get("/pay/{machine_id}/cancelled", response_class=HTMLResponse, summary="Payment cancelled")
def pay_cancelled(machine_id: MachineIdPath) -> Response:
    return _page(
        "Cancelled",
        "<h1>Payment cancelled</h1><p class=ok id=charged>You have not been charged.</p>"
        f'<p><a href="/pay/{machine_id}" style="color:#8ab4f8">Try again</a></p>',
    )
