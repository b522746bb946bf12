"""The `/v1` routes: Stripe's paths, form-encoded parameters, bearer-key authentication,
idempotency keys, injected faults, and Stripe's `Request-Id` / `Stripe-Version` headers."""

import asyncio
import json
from collections.abc import Callable
from typing import TypeVar

from fastapi import APIRouter, Request, Response

from insertcoin.server.payments.standin import params
from insertcoin.server.payments.standin.account import Account
from insertcoin.server.payments.standin.errors import ParamError, StripeError, invalid
from insertcoin.server.payments.standin.faults import Fault, Faults
from insertcoin.server.payments.standin.idempotency import IdempotencyKeys, Stored
from insertcoin.server.payments.standin.objects import API_VERSION, Json, Origin, new_id

P = TypeVar("P")
Parse = Callable[[params.Params], P]
Apply = Callable[[P, Origin], Json]


class Api:
    def __init__(
        self, account: Account, faults: Faults, keys: IdempotencyKeys, api_key: str | None
    ) -> None:
        self._account = account
        self._faults = faults
        self._keys = keys
        self._api_key = api_key

    def _authenticate(self, request: Request) -> StripeError | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return StripeError(
                401,
                "authentication_error",
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
            )
        accepted = key == self._api_key if self._api_key else key.startswith("sk_test_")
        if not accepted:
            return StripeError(
                401, "authentication_error", f"Invalid API Key provided: {key[:8]}****{key[-4:]}"
            )
        return None

    async def handle(self, request: Request, parse: Parse[P], apply: Apply[P]) -> Response:
        request_id = new_id("req_", 14)
        headers = {
            "Request-Id": request_id,
            "Stripe-Version": request.headers.get("stripe-version", API_VERSION),
        }
        denied = self._authenticate(request)
        if denied is not None:
            return _respond(denied.status, denied.body(), headers)
        post = request.method == "POST"
        raw = (await request.body()).decode(errors="replace") if post else request.url.query
        form = params.decode_form(raw)
        path = _route_path(request)
        key = request.headers.get("idempotency-key") if post else None
        if key is not None:
            headers["Idempotency-Key"] = key
            try:
                if len(key) > 255:
                    raise invalid("Idempotency keys can be up to 255 characters long.")
                stored = self._keys.begin(key, (request.method, path, form))
            except StripeError as refused:
                return _respond(refused.status, refused.body(), headers)
            if stored is not None:
                headers |= {"Request-Id": stored.request_id, "Idempotent-Replayed": "true"}
                return _respond(stored.status, stored.body, headers, stored_under_key=True)
        try:
            parsed = parse(params.Params(form))
            fault = self._faults.take(request.method, path)
            status, body = _run(lambda: apply(parsed, Origin(request_id, key)), fault)
        except BaseException as error:
            if key is not None:
                self._keys.abandon(key)
            if isinstance(error, ParamError):
                return _respond(error.status, error.body(), headers)
            raise
        if key is not None:
            self._keys.finish(key, Stored(status, body, request_id))
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        return _respond(status, body, headers, stored_under_key=key is not None)

    def router(self) -> APIRouter:
        account, router = self._account, APIRouter()

        @router.post("/v1/checkout/sessions")
        async def create_session(request: Request) -> Response:
            return await self.handle(
                request,
                lambda form: params.checkout_session(form, int(account.now())),
                account.create_session,
            )

        @router.get("/v1/checkout/sessions/{session_id}")
        async def retrieve_session(session_id: str, request: Request) -> Response:
            return await self.handle(
                request,
                params.retrieval(params.SESSION_EXPANSIONS),
                lambda query, _: account.retrieve_session(session_id, query.expand),
            )

        @router.post("/v1/checkout/sessions/{session_id}/expire")
        async def expire_session(session_id: str, request: Request) -> Response:
            return await self.handle(
                request,
                params.retrieval(params.SESSION_EXPANSIONS),
                lambda query, origin: account.expire_session(session_id, query.expand, origin),
            )

        @router.get("/v1/payment_intents/{intent_id}")
        async def retrieve_intent(intent_id: str, request: Request) -> Response:
            return await self.handle(
                request,
                params.retrieval(params.INTENT_EXPANSIONS),
                lambda query, _: account.retrieve_intent(intent_id, query.expand),
            )

        @router.post("/v1/payment_intents/{intent_id}/capture")
        async def capture(intent_id: str, request: Request) -> Response:
            return await self.handle(
                request,
                params.capture,
                lambda query, origin: account.capture(intent_id, query, origin),
            )

        @router.post("/v1/payment_intents/{intent_id}/cancel")
        async def cancel(intent_id: str, request: Request) -> Response:
            return await self.handle(
                request,
                params.cancel,
                lambda query, origin: account.cancel(intent_id, query, origin),
            )

        @router.post("/v1/refunds")
        async def create_refund(request: Request) -> Response:
            return await self.handle(request, params.refund, account.create_refund)

        @router.get("/v1/refunds")
        async def list_refunds(request: Request) -> Response:
            return await self.handle(
                request, params.refunds, lambda query, _: account.list_refunds(query)
            )

        @router.get("/v1/refunds/{refund_id}")
        async def retrieve_refund(refund_id: str, request: Request) -> Response:
            return await self.handle(
                request,
                params.retrieval(params.REFUND_EXPANSIONS),
                lambda query, _: account.retrieve_refund(refund_id, query.expand),
            )

        @router.get("/v1/events")
        async def list_events(request: Request) -> Response:
            return await self.handle(
                request, params.events, lambda query, _: account.list_events(query)
            )

        @router.get("/v1/events/{event_id}")
        async def retrieve_event(event_id: str, request: Request) -> Response:
            return await self.handle(
                request, params.retrieval(()), lambda _, __: account.retrieve_event(event_id)
            )

        @router.api_route("/v1/{rest:path}", methods=["GET", "POST", "DELETE"])
        async def unknown(request: Request) -> Response:
            error = StripeError(
                404,
                "invalid_request_error",
                f"Unrecognized request URL ({request.method}: {_route_path(request)}).",
            )
            return _respond(error.status, error.body(), {})

        return router


def _run(effect: Callable[[], Json], fault: Fault | None) -> tuple[int, Json]:
    """Apply the request's effect, failing before or after it when a fault says so."""
    failing = fault is not None and not fault.delay
    if fault is not None and failing and fault.when == "before":
        return fault.status, fault.error().body()
    try:
        status, body = 200, effect()
    except StripeError as error:
        status, body = error.status, error.body()
    if fault is not None and failing:  # "after": the effect stands, the caller sees an error
        return fault.status, fault.error().body()
    return status, body


def _respond(
    status: int, body: Json, headers: dict[str, str], *, stored_under_key: bool = False
) -> Response:
    if stored_under_key and status >= 500:
        # Stripe would replay this very answer, so the SDK need not retry it.
        headers = {**headers, "Stripe-Should-Retry": "false"}
    return Response(json.dumps(body), status, headers, media_type="application/json")


def _route_path(request: Request) -> str:
    """The path below wherever the app is mounted (`/_stripe` in simulated payments)."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
