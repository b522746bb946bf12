"""The Stripe SDK's HTTP transport: keep-alive connections from the standard library's
`http.client`, kept between calls and shared by every thread that calls Stripe.

The SDK's default transport is `requests`, whose per-call work (merging environment
settings, hooks, cookies, adapters) was a third of every Stripe call's CPU. urllib3,
which `requests` sends with, still cost about as much again as the SDK itself (it
re-parses and re-encodes every URL twice, and has pool and response layers); the
`http.client` it sends with in turn makes the same call for 30 to 40% less CPU (a
session re-read from the stand-in: 470 to 680 µs with urllib3, 370 to 430 with it). The
SDK keeps all the rest: authentication, API version, idempotency keys, its error types.

Imported on first use of the SDK, like `stripe` itself.
"""

import base64
import http.client
import select
import ssl
import sys
import threading
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

# When it loads, the SDK imports every HTTP library it finds (requests, httpx, aiohttp)
# to pick its default transports. This server gives it its own transport and never uses
# them, yet they would stay in memory for the process's life: about 4 MiB for requests
# in a server install, 11 MiB with httpx and aiohttp in a development one. A None in
# `sys.modules` makes an import fail (the SDK then falls back to urllib, unused); the
# entries go right after, so a later import of these libraries works as usual.
_UNUSED = [name for name in ("requests", "httpx", "aiohttp") if name not in sys.modules]
sys.modules.update(dict.fromkeys(_UNUSED))  # type: ignore[arg-type]
try:
    import stripe
finally:
    for name in _UNUSED:
        if sys.modules.get(name, ...) is None:
            del sys.modules[name]

# Idle connections kept for the next call: one per thread that may call at once
# (intake's readers and settlement's callers); a burst past that opens more, closed after.
_POOL_SIZE = 16


class StripeTransport(stripe.HTTPClient):
    name = "http.client"

    def __init__(self, api_base: str, timeout: float) -> None:
        super().__init__()
        target = urlsplit(api_base)
        self._origin = f"{target.scheme}://{target.netloc}"
        self._host = target.hostname or ""
        self._tls = target.scheme == "https"
        self._port = target.port or (443 if self._tls else 80)
        self._timeout = timeout
        # The CA bundle the SDK ships with, as its own transports use.
        self._context = (
            ssl.create_default_context(cafile=stripe.ca_bundle_path) if self._tls else None
        )
        self._via = _proxy_for(api_base)
        self._via_headers = _proxy_auth(self._via) if self._via is not None else {}
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self._via is None:
            host, port = self._host, self._port
        else:
            host, port = self._via.hostname or "", self._via.port or 80
        if not self._tls:
            return http.client.HTTPConnection(host, port, timeout=self._timeout)
        connection = http.client.HTTPSConnection(
            host, port, timeout=self._timeout, context=self._context
        )
        if self._via is not None:
            # To an HTTPS Stripe, a proxy only relays the encrypted stream (CONNECT).
            connection.set_tunnel(self._host, self._port, headers=self._via_headers)
        return connection

    def _take(self) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                if not self._idle:
                    return self._connect()
                connection = self._idle.pop()
            if not _dropped(connection):
                return connection
            connection.close()

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < _POOL_SIZE:
                self._idle.append(connection)
                return
        connection.close()

    # The body comes back as bytes, as from the SDK's own RequestsClient (its base class
    # says str); the headers as http.client's message, which looks names up regardless
    # of case, as the SDK does (`Request-Id`, `request-id`).
    def request(  # type: ignore[override]
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[bytes, int, http.client.HTTPMessage]:
        if not url.startswith(self._origin):
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"not a Stripe address this server was given: {url}"
            )
        sent = dict(headers or {})
        if self._via is not None and not self._tls:
            # Through a proxy, plain HTTP asks for the whole URL (and shows credentials).
            target = url
            sent.update(self._via_headers)
        else:
            target = url[len(self._origin) :]
        body = post_data.encode() if isinstance(post_data, str) else post_data
        connection = self._take()
        try:
            connection.request(method.upper(), target, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            # Timeouts, refused or dropped connections, TLS failures: no answer came.
            connection.close()
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"network error talking to Stripe: {exc!r}", should_retry=True
            ) from exc
        if response.will_close:
            connection.close()
        else:
            self._give_back(connection)
        return data, response.status, response.headers

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def new_client(api_key: str, api_base: str | None, timeout: float) -> stripe.StripeClient:
    """A `StripeClient` sending through `StripeTransport`, with `api_base` (or Stripe's)."""
    base = api_base or stripe.DEFAULT_API_BASE
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": base},
        # Retries are the gateway's: after a 5xx it re-reads before deciding.
        max_network_retries=0,
        http_client=StripeTransport(base, timeout),
    )


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """An idle connection the other end has closed (or sent something unasked on): it
    reads as ready. Reusing it would fail the call, so it is replaced instead."""
    if connection.sock is None:
        return False  # not connected yet: request() connects it
    poll = select.poll()
    poll.register(connection.sock, select.POLLIN)
    return bool(poll.poll(0))


def _proxy_for(url: str) -> SplitResult | None:
    """The proxy the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) names for `url`
    (split), resolved once: looking it up on every call would cost more than the call."""
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    return urlsplit(proxy if "://" in proxy else f"http://{proxy}") if proxy else None


def _proxy_auth(proxy: SplitResult) -> dict[str, str]:
    """Basic credentials for the proxy, when its URL carries them (user:password@)."""
    if proxy.username is None:
        return {}
    pair = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
