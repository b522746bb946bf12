"""The gateway's HTTP transport, against the stand-in over real HTTP: it goes through the
proxy the environment names (a tunnel for HTTPS, with the proxy URL's credentials; around
it for NO_PROXY hosts), keeps connections alive and replaces those the other end closed,
a Stripe that does not answer is `StripeUnavailable` with no status, and the SDK's own
HTTP libraries are not loaded into the server."""

import base64
import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from insertcoin.server.payments.gateway import StripeGateway, StripeRefused, StripeUnavailable
from tests.support.http_server import LocalServer, QuietHandler
from tests.support.services import free_port
from tests.support.standin import API_KEY, StandInThread, standin_thread


class ForwardProxy(LocalServer):
    """A plain HTTP forward proxy that records each request line it relays."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.credentials: list[str | None] = []
        proxy = self

        class Handler(QuietHandler):
            def _relay(self) -> None:
                proxy.seen.append(f"{self.command} {self.path}")
                proxy.credentials.append(self.headers.get("Proxy-Authorization"))
                length = int(self.headers.get("Content-Length") or 0)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                target = urlsplit(self.path)
                upstream = http.client.HTTPConnection(target.netloc, timeout=10)
                try:
                    upstream.request(
                        self.command,
                        self.path[len(f"{target.scheme}://{target.netloc}") :],
                        body=self.rfile.read(length) if length else None,
                        headers=headers,
                    )
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for name in ("Content-Type", "Request-Id"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _relay

            def do_CONNECT(self) -> None:
                proxy.seen.append(f"{self.command} {self.path}")
                proxy.credentials.append(self.headers.get("Proxy-Authorization"))
                self.send_error(502, "no tunnels here")

        super().__init__(Handler)


@pytest.fixture(scope="module")
def standin() -> Iterator[StandInThread]:
    with standin_thread(None) as running:
        yield running


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ForwardProxy]:
    running = ForwardProxy()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", running.url)
    try:
        yield running
    finally:
        running.stop()


def _session(standin: StandInThread) -> str:
    item = {
        "price_data": {"currency": "usd", "unit_amount": 100, "product_data": {"name": "1"}},
        "quantity": 1,
    }
    session = standin.client().v1.checkout.sessions.create(
        params={"mode": "payment", "line_items": [item], "success_url": "https://x.test/"}
    )
    return str(session.id)


def _proxied_only(proxy: ForwardProxy, standin: StandInThread) -> StripeGateway:
    """A gateway built now; the proxy forgets what the test's own set-up sent through it."""
    proxy.seen.clear()
    return StripeGateway(API_KEY, api_base=standin.url, timeout=5)


def test_calls_go_through_the_proxy_the_environment_names(
    standin: StandInThread, proxy: ForwardProxy
) -> None:
    session_id = _session(standin)
    gateway = _proxied_only(proxy, standin)
    assert gateway.retrieve_session(session_id).id == session_id
    assert not gateway.has_refund("pi_none")
    assert proxy.seen == [
        f"GET {standin.url}/v1/checkout/sessions/{session_id}"
        "?expand[0]=payment_intent&expand[1]=line_items",  # as the SDK writes it
        f"GET {standin.url}/v1/refunds?payment_intent=pi_none&limit=1",
    ]
    with pytest.raises(StripeRefused) as refused:
        gateway.retrieve_payment_intent("pi_missing")
    assert refused.value.status == 404
    assert len(proxy.seen) == 3


def test_no_proxy_hosts_are_called_directly(
    standin: StandInThread, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    session_id = _session(standin)
    gateway = _proxied_only(proxy, standin)
    assert gateway.retrieve_session(session_id).id == session_id
    assert proxy.seen == []


def test_https_goes_through_a_tunnel_with_the_proxy_urls_credentials(
    proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """To an HTTPS Stripe the proxy is asked for a tunnel (CONNECT), never shown a
    request; here it refuses one, which is no answer from Stripe."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://ops:s%40fe@"))
    port = free_port()
    gateway = StripeGateway(API_KEY, api_base=f"https://127.0.0.1:{port}", timeout=5)
    with pytest.raises(StripeUnavailable) as unavailable:
        gateway.retrieve_payment_intent("pi_anything")
    assert unavailable.value.status is None
    assert proxy.seen == [f"CONNECT 127.0.0.1:{port}"]
    assert proxy.credentials == ["Basic " + base64.b64encode(b"ops:s@fe").decode()]


class ClosingServer(LocalServer):
    """Answers every request as Stripe would a payment intent, over keep-alive
    connections; counts the connections, and can close the idle ones from its side."""

    def __init__(self) -> None:
        self.connections: list[socket.socket] = []
        server = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                server.connections.append(self.connection)

            def do_GET(self) -> None:
                body = b'{"id": "pi_1", "object": "payment_intent", "status": "succeeded"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)

    def close_idle(self) -> None:
        for connection in self.connections:
            connection.shutdown(socket.SHUT_RDWR)


def test_connections_are_kept_alive_and_replaced_once_the_other_end_closed_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = ClosingServer()
    try:
        gateway = StripeGateway(API_KEY, api_base=server.url, timeout=5)
        for _ in range(3):
            assert gateway.retrieve_payment_intent("pi_1").status == "succeeded"
        assert len(server.connections) == 1
        server.close_idle()  # as Stripe does with a connection idle for too long
        time.sleep(0.2)
        assert gateway.retrieve_payment_intent("pi_1").status == "succeeded"
        assert len(server.connections) == 2
    finally:
        server.stop()


def test_a_stripe_that_does_not_answer_is_unavailable_with_no_status() -> None:
    gateway = StripeGateway(API_KEY, api_base=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(StripeUnavailable) as unavailable:
        gateway.retrieve_payment_intent("pi_anything")
    assert unavailable.value.status is None
    assert "network error" in str(unavailable.value)


_CHILD = """
import sys
from insertcoin.server.payments.gateway import StripeGateway
gateway = StripeGateway(sys.argv[1], api_base=sys.argv[2], timeout=5)
print(gateway.retrieve_session(sys.argv[3]).id)
print(sorted({"requests", "httpx", "aiohttp"} & sys.modules.keys()))
import requests, httpx
print(requests.__name__, httpx.__name__)
"""


def test_the_sdk_loads_without_the_http_libraries_it_is_not_given(
    standin: StandInThread,
) -> None:
    """A fresh process, as the server: the gateway works, and neither requests nor httpx
    (nor aiohttp) was imported on the way (a development install has all three), while
    importing them later still works."""
    session_id = _session(standin)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, API_KEY, standin.url, session_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == [session_id, "[]", "requests httpx"]
