"""The hosted checkout page (`/c/pay/{id}`): what the player sees after scanning, with a
test-card field, Pay and Cancel. A plain HTML form, no external assets."""

from html import escape
from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from insertcoin.server.payments.standin.account import Account
from insertcoin.server.payments.standin.errors import CheckoutError
from insertcoin.server.payments.standin.money import format_amount
from insertcoin.server.payments.standin.objects import Session

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1a1f36}
main{max-width:26rem;margin:0 auto;padding:1.5rem}
h1{font-size:1.3rem}.price{font-size:1.1rem}.total{font-weight:600}
label{display:block;margin:1rem 0 .3rem}
input,select{width:100%;box-sizing:border-box;font-size:1.1rem;padding:.6rem}
button{width:100%;font-size:1.1rem;padding:.8rem;margin-top:1rem;border:0;border-radius:.4rem}
#pay{background:#635bff;color:#fff}#cancel{background:#e3e8ee}
#error{color:#c0123c;min-height:1.2em}.note{color:#697386;font-size:.9rem}
"""


def redirect_url(session: Session) -> str:
    return session.terms.success_url.replace("{CHECKOUT_SESSION_ID}", session.id)


def _html(title: str, content: str, status: int) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{content}</main></body></html>",
        status,
    )


def _message(error: CheckoutError) -> HTMLResponse:
    return _html(
        "Checkout", f"<h1>Checkout</h1><p id=error>{escape(error.message)}</p>", error.status
    )


def _page(session: Session, error: str = "", status: int = 200) -> HTMLResponse:
    terms = session.terms
    if session.status != "open":
        message = (
            "This checkout session has expired. You have not been charged."
            if session.status == "expired"
            else "This checkout session is already complete."
        )
        return _message(CheckoutError(message, status))
    if terms.adjustable is None:
        quantity = f"<p>Quantity: {session.quantity}</p>"
    else:
        low, high = max(terms.adjustable[0], 1), terms.adjustable[1]
        quantity = (
            "<label for=quantity>Quantity</label>"
            f"<input id=quantity name=quantity type=number min={low} max={high} "
            f"value={session.quantity} required>"
        )
    methods = [
        (method, label)
        for method, label in (("card", "Card"), ("bank_transfer", "Bank transfer (delayed)"))
        if terms.accepts(method)
    ]
    options = "".join(f"<option value={value}>{escape(label)}</option>" for value, label in methods)
    cancel = (
        "<button id=cancel name=action value=cancel formnovalidate>Cancel</button>"
        if terms.cancel_url
        else ""
    )
    content = f"""
<h1>{escape(terms.product_name)}</h1>
<p class=price>{format_amount(terms.unit_amount, terms.currency)} each</p>
<form method=post>
{quantity}
<p class=total>Total: {format_amount(session.amount_total, terms.currency)}</p>
<label for=method>Payment method</label>
<select id=method name=method>{options}</select>
<label for=card-number>Card number (bank transfer: account)</label>
<input id=card-number name=card_number inputmode=numeric autocomplete=off
 placeholder="4242 4242 4242 4242">
<p class=note>Test mode: 4242 4242 4242 4242 pays, 4000 0000 0000 0002 is declined;
for a bank transfer, the account "fail" fails.</p>
<p id=error role=alert>{escape(error)}</p>
<button id=pay name=action value=pay>Pay</button>
{cancel}
</form>"""
    return _html(f"Pay {terms.product_name}", content, status)


def router(account: Account) -> APIRouter:
    router = APIRouter()

    @router.get("/c/pay/{session_id}")
    def show(session_id: str) -> Response:
        try:
            return _page(account.checkout_view(session_id))
        except CheckoutError as error:
            return _message(error)

    @router.post("/c/pay/{session_id}")
    async def submit(session_id: str, request: Request) -> Response:
        # python-multipart is not installed: the urlencoded form is decoded here.
        form = {
            name: values[-1]
            for name, values in parse_qs((await request.body()).decode(errors="replace")).items()
        }
        try:
            session = account.checkout_view(session_id)
            if form.get("action") == "cancel":
                cancel_url = session.terms.cancel_url
                return RedirectResponse(cancel_url, 303) if cancel_url else _page(session)
            quantity = form.get("quantity")
            if quantity is not None and not quantity.strip().isdigit():
                raise CheckoutError("Choose a quantity.")
            account.pay(
                session_id,
                card=form.get("card_number", ""),
                quantity=None if quantity is None else int(quantity),
                method=form.get("method", "card"),
            )
            return RedirectResponse(redirect_url(session), 303)
        except CheckoutError as error:
            try:
                return _page(account.checkout_view(session_id), error.message, error.status)
            except CheckoutError as missing:
                return _message(missing)

    return router
