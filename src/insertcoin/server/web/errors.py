"""Domain errors → HTTP, in one place. Always JSON `{"detail": ...}`."""

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from insertcoin.server.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized

log = structlog.get_logger(__name__)

_STATUS: dict[type[Exception], int] = {
    NotFound: 404,
    Conflict: 409,
    Invalid: 409,
    Unauthorized: 401,
    Forbidden: 403,
}

MAX_BODY_BYTES = 64 * 1024


def install(app: FastAPI) -> None:
    for error, status in _STATUS.items():

        async def handler(_: Request, exc: Exception, status: int = status) -> JSONResponse:
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

        app.add_exception_handler(error, handler)

    async def database_away(_: Request, exc: Exception) -> JSONResponse:
        # Only reached when the database itself fails: bad input never gets this far.
        log.error("database_error", error=type(exc).__name__)
        return JSONResponse(
            {"detail": "the database is unavailable; try again shortly"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    app.add_exception_handler(OperationalError, database_away)


class BodyLimit:
    """Refuse bodies over MAX_BODY_BYTES with 413 before any route sees them.

    A declared Content-Length is checked up front; a chunked body is read here, up to
    the limit, and handed on whole, so the route never starts on an oversized one.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await self._refuse(scope, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body exceeds {self.limit} bytes"}, status_code=413
        )
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
