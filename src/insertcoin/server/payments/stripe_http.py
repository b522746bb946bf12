"""The Stripe SDK's HTTP transport: urllib3 connection pools, one per address, shared by
every thread that calls Stripe.

The SDK's default transport is `requests`, whose per-call work (merging environment
settings, hooks, cookies, adapters) was a third of every Stripe call's CPU; urllib3
(what `requests` sends with) does the same call for about 0.35 ms less. The SDK keeps
all the rest: authentication, API version, idempotency keys and its error types.

Imported on first use of the SDK, like `stripe` itself.
"""

import sys
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import urllib3

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

# One connection per thread that may call at once (intake's readers and settlement's
# callers); a burst past that opens extra connections rather than waiting.
_POOL_SIZE = 16


class StripeTransport(stripe.HTTPClient):
    name = "urllib3"

    def __init__(self, api_base: str, timeout: float) -> None:
        super().__init__()
        options: dict[str, Any] = {
            "maxsize": _POOL_SIZE,
            "timeout": urllib3.Timeout(connect=timeout, read=timeout),
            # Retries are the gateway's: after an unknown outcome it re-reads first.
            "retries": False,
            # The CA bundle the SDK ships with, as its own transports use.
            "ca_certs": stripe.ca_bundle_path,
        }
        proxy = _proxy_for(api_base)
        self._pool = (
            urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        )

    # The body comes back as bytes, as from the SDK's own RequestsClient (its base class
    # says str).
    def request(  # type: ignore[override]
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            response = self._pool.request(
                method.upper(),
                url,
                headers=dict(headers or {}),
                body=post_data,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            # Timeouts, refused or dropped connections, TLS failures: no answer came.
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"network error talking to Stripe: {exc}", should_retry=True
            ) from exc
        return response.data, response.status, response.headers

    def close(self) -> None:
        self._pool.clear()


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


def _proxy_for(url: str) -> str | None:
    """The proxy the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) names for `url`,
    resolved once: looking it up on every call would cost more than the call."""
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)
