"""The attract screen and the local API, on plain `http.server`.

A cabinet PC needs nothing more than a handful of routes for one browser and one game,
so the agent carries no web framework. Every request is answered with JSON or the page;
a malformed one gets a 4xx and a log line, never a dead server.
"""

import contextlib
import io
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

import orjson
import segno
import structlog

from insertcoin.agent.screen import page

log = structlog.get_logger("insertcoin.agent.screen")

MAX_BODY_BYTES = 4096
KEEPALIVE_SECONDS = 15.0
# Each event stream holds a thread; a cabinet has one screen, so a few suffice.
MAX_STREAMS = 16
# Draining a refused body lets the client read the 413 instead of a connection reset.
_MAX_DRAIN_BYTES = 64 * 1024
_SOCKET_TIMEOUT_SECONDS = 10.0


class AgentView(Protocol):
    """What the screen needs from the agent core."""

    def snapshot(self) -> dict[str, Any]:
        """machineId, name, state, credits, online, payUrl, price, creditsPerPurchase."""

    def game_over(self) -> dict[str, Any]:
        """End the running game; the new snapshot. ValueError(reason) when none runs."""

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every change of the snapshot."""


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8765' → ('127.0.0.1', 8765); '[::1]:0' → ('::1', 0)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"screen.listen must be host:port, got {listen!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


class _Server(ThreadingHTTPServer):
    # Event streams never end by themselves; stop() must not wait for them.
    daemon_threads = True
    screen: "Screen"


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class Screen:
    """Serves the attract page and local API for `agent` on `listen` ("host:port")."""

    def __init__(self, listen: str, agent: AgentView) -> None:
        self._address = parse_listen(listen)
        self._agent = agent
        self._changed = threading.Condition()
        self._version = 0
        self._closing = False
        self._streams = 0
        self._qr_lock = threading.Lock()
        self._qr: tuple[str, bytes] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        agent.subscribe(self._notify)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the screen is not started")
        # A wildcard address is reachable locally through loopback.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(  # noqa: S104
            self._address[0], self._address[0]
        )
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self._server.server_port}/"

    def start(self) -> None:
        host, port = self._address
        with self._changed:
            self._closing = False
        cls = _IPv6Server if ":" in host else _Server
        server = cls((host, port), _Handler)
        server.screen = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="screen", daemon=True
        )
        self._thread.start()
        log.info("screen_started", url=self.url)

    def stop(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    # --- used by the handler -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return self._agent.snapshot()

    def game_over(self) -> dict[str, Any]:
        return self._agent.game_over()

    def qr_svg(self, pay_url: str) -> bytes:
        with self._qr_lock:
            if self._qr is None or self._qr[0] != pay_url:
                out = io.BytesIO()
                segno.make(pay_url, error="m", micro=False).save(
                    out,
                    kind="svg",
                    border=4,
                    omitsize=True,
                    xmldecl=False,
                    dark="#000",
                    light="#fff",
                )
                self._qr = (pay_url, out.getvalue())
            return self._qr[1]

    def open_stream(self) -> int | None:
        """The current version to stream from, or None when too many streams are open."""
        with self._changed:
            if self._streams >= MAX_STREAMS or self._closing:
                return None
            self._streams += 1
            return self._version

    def close_stream(self) -> None:
        with self._changed:
            self._streams -= 1

    def wait_change(self, seen: int, timeout: float) -> int | None:
        """The new version once it differs from `seen`, `seen` on timeout, None when stopping."""
        with self._changed:
            self._changed.wait_for(lambda: self._closing or self._version != seen, timeout)
            return None if self._closing else self._version


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _SOCKET_TIMEOUT_SECONDS
    server_version = "insertcoin-agent"
    sys_version = ""

    # --- dispatch ------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._dispatch(head=False)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    _ROUTES: ClassVar[dict[str, frozenset[str]]] = {
        "/": frozenset({"GET", "HEAD"}),
        "/state": frozenset({"GET", "HEAD"}),
        "/events": frozenset({"GET"}),
        "/qr.svg": frozenset({"GET", "HEAD"}),
        "/gameover": frozenset({"POST"}),
    }

    def _dispatch(self, *, head: bool) -> None:
        try:
            if not self._body_acceptable():
                return
            path = self.path.split("?", 1)[0]
            allowed = self._ROUTES.get(path)
            if allowed is None:
                self._json(HTTPStatus.NOT_FOUND, {"detail": "not found"}, head=head)
            elif self.command not in allowed:
                self._json(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    {"detail": f"{self.command} is not allowed on {path}"},
                    head=head,
                    headers={"Allow": ", ".join(sorted(allowed))},
                )
            else:
                self._route(path, head=head)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("screen_request_failed", method=self.command, path=self.path)
            self.close_connection = True
            self._try_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"detail": "internal error"})

    def _route(self, path: str, *, head: bool) -> None:
        screen = self.server.screen
        if path == "/":
            self._send(
                HTTPStatus.OK,
                "text/html; charset=utf-8",
                page.render(screen.snapshot()),
                head=head,
                headers={"Content-Security-Policy": page.CONTENT_SECURITY_POLICY},
            )
        elif path == "/state":
            self._json(HTTPStatus.OK, screen.snapshot(), head=head)
        elif path == "/qr.svg":
            pay_url = screen.snapshot().get("payUrl")
            if not isinstance(pay_url, str) or not pay_url:
                self._json(HTTPStatus.NOT_FOUND, {"detail": "no payUrl configured yet"}, head=head)
            else:
                self._send(HTTPStatus.OK, "image/svg+xml", screen.qr_svg(pay_url), head=head)
        elif path == "/events":
            self._stream(screen)
        else:
            self._game_over(screen)

    def _game_over(self, screen: Screen) -> None:
        origin = self.headers.get("Origin")
        if origin is not None and origin.rstrip("/") != f"http://{self.headers.get('Host')}":
            # A web page the cabinet's browser happens to show must not end games.
            log.warning("screen_gameover_cross_origin", origin=origin)
            self._json(HTTPStatus.FORBIDDEN, {"detail": "cross-origin request refused"})
            return
        try:
            snapshot = screen.game_over()
        except ValueError as exc:
            self._json(HTTPStatus.CONFLICT, {"detail": str(exc)})
            return
        self._json(HTTPStatus.OK, snapshot)

    def _stream(self, screen: Screen) -> None:
        seen = screen.open_stream()
        if seen is None:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"detail": "too many event streams"})
            return
        self.close_connection = True
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            # The page reconnects after 2 s when the agent restarts.
            self._event(b"retry: 2000\n\n" + self._data(screen.snapshot()))
            while True:
                version = screen.wait_change(seen, KEEPALIVE_SECONDS)
                if version is None:
                    return
                if version == seen:
                    self._event(b": keep-alive\n\n")
                else:
                    seen = version
                    self._event(self._data(screen.snapshot()))
        finally:
            screen.close_stream()

    @staticmethod
    def _data(snapshot: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(snapshot) + b"\n\n"

    def _event(self, chunk: bytes) -> None:
        self.wfile.write(chunk)
        self.wfile.flush()

    # --- request body --------------------------------------------------------------

    def _body_acceptable(self) -> bool:
        """Refuse bodies this API never needs: chunked, unparsable or over 4 KiB."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._json(HTTPStatus.LENGTH_REQUIRED, {"detail": "send a Content-Length"})
            return False
        raw = self.headers.get("Content-Length", "0").strip() or "0"
        if not raw.isdigit():
            self.close_connection = True
            self._json(HTTPStatus.BAD_REQUEST, {"detail": "Content-Length is not a number"})
            return False
        length = int(raw)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._drain(length)
            self._json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"detail": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"},
            )
            return False
        # No route reads a body (game over needs none), but it must leave the socket.
        if length:
            self.rfile.read(length)
        return True

    def _drain(self, length: int) -> None:
        if length > _MAX_DRAIN_BYTES:
            return
        with contextlib.suppress(OSError):
            self.rfile.read(length)

    # --- responses -----------------------------------------------------------------

    def _json(
        self,
        status: HTTPStatus,
        body: dict[str, Any],
        *,
        head: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._send(status, "application/json", orjson.dumps(body), head=head, headers=headers)

    def _try_json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self._json(status, body)

    def _send(
        self,
        status: HTTPStatus,
        content_type: str,
        body: bytes,
        *,
        head: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (bad request line, oversized headers, unknown method)
        as JSON like every other answer."""
        log.info("screen_bad_request", status=int(code), reason=message)
        self.close_connection = True
        # The base class answers a two-word request line as HTTP/0.9, without a status
        # line; no client of ours speaks 0.9, so the status is worth more.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self._json(status, {"detail": message or status.phrase}, head=self.command == "HEAD")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("screen_request", line=format % args)
