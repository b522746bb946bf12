"""The most trivial ASGI app, served by uvicorn exactly as `insertcoin serve` serves the
real one: the load generator's ceiling is measured against it.

    python -m uvicorn bench.echo_app:app --port 8001
"""

from typing import Any

_BODY = b'{"creditId":"cr_00000000000000000000000000000000","state":"pending"}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the request body like a real route would
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 201, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})
