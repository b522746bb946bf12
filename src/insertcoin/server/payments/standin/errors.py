"""Stripe's error answers (`{"error": {"type", "message", "param"?, "code"?}}` with a status,
which the SDK turns into its exception classes) and the hosted page's errors."""

from typing import Any


class StripeError(Exception):
    """An API error answered with Stripe's JSON shape; stored under an idempotency key."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
        return {"error": error}


class ParamError(StripeError):
    """The request's parameters are invalid: Stripe stores no idempotent result for it."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(400, "invalid_request_error", message, param=param, code=code)


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> StripeError:
    """A request refused because of the state of the objects it acts on."""
    return StripeError(400, "invalid_request_error", message, param=param, code=code)


def no_such(kind: str, object_id: str, param: str, status: int = 404) -> StripeError:
    return StripeError(
        status,
        "invalid_request_error",
        f"No such {kind}: '{object_id}'",
        param=param,
        code="resource_missing",
    )


class CheckoutError(Exception):
    """What the hosted page tells the customer (declined card, expired session)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
