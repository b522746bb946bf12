"""The attract screen and local API, served for a fake agent: the routes answer what they
should, bad requests get a 4xx and leave the server running, and in Chromium at 1920x1080
the page's QR decodes to the payUrl and credits update live without a reload."""

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import zxingcpp
from PIL import Image
from playwright.sync_api import Browser, Page, expect

from insertcoin.agent.screen import Screen, server

PAY_URL = "https://pay.example.com/pay/arcade123"


class FakeAgent:
    """Holds a snapshot and tells subscribers when a test changes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[], None]] = []
        self._state: dict[str, Any] = {
            "machineId": "arcade123",
            "name": "Galaga Cabinet",
            "state": "attract",
            "credits": 0,
            "online": True,
            "payUrl": PAY_URL,
            "price": {"amount": 100, "currency": "usd"},
            "creditsPerPurchase": 2,
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def game_over(self) -> dict[str, Any]:
        with self._lock:
            if self._state["state"] != "playing":
                raise ValueError("no game is running")
            self._state["state"] = "attract"
        self._notify()
        return self.snapshot()

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._subscribers.append(callback)

    def set(self, **changes: Any) -> None:
        with self._lock:
            self._state.update(changes)
        self._notify()

    def _notify(self) -> None:
        for callback in self._subscribers:
            callback()


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def screen(agent: FakeAgent) -> Iterator[Screen]:
    running = Screen("127.0.0.1:0", agent)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def client(screen: Screen) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=screen.url, timeout=5) as http:
        yield http


def _raw(screen: Screen, request: bytes) -> bytes:
    """Send bytes as they are (no client fixes them up) and read the whole answer."""
    port = int(screen.url.rsplit(":", 1)[1].rstrip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _events(response: httpx.Response) -> Iterator[str]:
    """Each SSE data payload or comment line, as it arrives."""
    for line in response.iter_lines():
        if line.startswith(("data: ", ":")):
            yield line


def test_state_is_the_agents_snapshot(client: httpx.Client, agent: FakeAgent) -> None:
    """GET /state answers the agent's snapshot as JSON."""
    response = client.get("/state")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == agent.snapshot()


def test_events_push_every_change(client: httpx.Client, agent: FakeAgent) -> None:
    """GET /events sends the snapshot on connect and again after each change."""
    with client.stream("GET", "/events") as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = _events(response)
        assert orjson.loads(next(events).removeprefix("data: "))["credits"] == 0
        agent.set(credits=4)
        assert orjson.loads(next(events).removeprefix("data: "))["credits"] == 4


def test_events_keep_alive_while_idle(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle stream carries a comment line, so proxies and the browser keep it open."""
    monkeypatch.setattr(server, "KEEPALIVE_SECONDS", 0.1)
    with client.stream("GET", "/events") as response:
        events = _events(response)
        assert next(events).startswith("data: ")
        assert next(events) == ": keep-alive"


def test_stop_ends_open_streams(agent: FakeAgent) -> None:
    """stop() returns promptly even while a browser holds an event stream open."""
    running = Screen("127.0.0.1:0", agent)
    running.start()
    with httpx.Client(base_url=running.url, timeout=5) as http, http.stream("GET", "/events"):
        started = time.monotonic()
        running.stop()
        assert time.monotonic() - started < 2


def test_gameover_ends_the_running_game(client: httpx.Client, agent: FakeAgent) -> None:
    """POST /gameover while playing answers 200 with the new snapshot."""
    agent.set(state="playing", credits=1)
    response = client.post("/gameover")
    assert response.status_code == 200
    assert response.json()["state"] == "attract"


def test_gameover_without_a_game_is_a_conflict(client: httpx.Client) -> None:
    """POST /gameover with no game running answers 409 with the agent's reason."""
    response = client.post("/gameover", json={"ignored": True})
    assert response.status_code == 409
    assert response.json() == {"detail": "no game is running"}


def test_gameover_from_another_origin_is_refused(client: httpx.Client, agent: FakeAgent) -> None:
    """A web page on another origin cannot end the game through the cabinet's browser."""
    agent.set(state="playing")
    response = client.post("/gameover", headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert agent.snapshot()["state"] == "playing"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("GET", "/gameover", 405), ("DELETE", "/state", 405)],
)
def test_unknown_routes_and_methods(
    client: httpx.Client, method: str, path: str, status: int
) -> None:
    """Unknown paths are 404 and wrong methods 405, both as JSON."""
    response = client.request(method, path)
    assert response.status_code == status
    assert "detail" in response.json()


def test_oversized_bodies_are_refused(client: httpx.Client, screen: Screen) -> None:
    """Bodies over 4 KiB get 413, whether sent or only announced."""
    assert client.post("/gameover", content=b"x" * 5000).status_code == 413
    announced = _raw(
        screen, b"POST /gameover HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    assert announced.startswith(b"HTTP/1.0 413")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET /state HTTP/9.9\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"POST /gameover HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        b"POST /gameover HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"BREW /state HTTP/1.1\r\n\r\n",
        b"GET /state HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    ],
)
def test_malformed_requests_get_4xx_and_the_server_lives(
    screen: Screen, client: httpx.Client, request_bytes: bytes
) -> None:
    """Garbage, bad versions, huge URLs and headers, chunked or unparsable lengths and
    unknown methods are answered 4xx/5xx as JSON, and the next request is served."""
    answer = _raw(screen, request_bytes)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 600, answer[:200]
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
    assert client.get("/state").status_code == 200


def test_a_failing_agent_is_a_500_not_a_crash(
    client: httpx.Client, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception inside the agent answers 500 and the server keeps serving."""

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(agent, "game_over", broken)
    assert client.post("/gameover").status_code == 500
    assert client.get("/state").status_code == 200


def test_qr_is_svg_and_absent_until_configured(client: httpx.Client, agent: FakeAgent) -> None:
    """/qr.svg is an SVG of the payUrl; without a payUrl there is nothing to show (404)."""
    response = client.get("/qr.svg")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    assert response.content.startswith(b"<svg")
    agent.set(payUrl=None)
    assert client.get("/qr.svg").status_code == 404


@pytest.mark.parametrize("listen", ["8765", "host:", ":80", "host:99999", "host:http"])
def test_bad_listen_addresses_are_refused(agent: FakeAgent, listen: str) -> None:
    """A listen value that is not host:port fails with a message naming the setting."""
    with pytest.raises(ValueError, match=r"screen\.listen"):
        Screen(listen, agent)


# --- in the browser ----------------------------------------------------------------


@pytest.fixture
def tv(browser: Browser, screen: Screen) -> Iterator[Page]:
    """The attract page on a 1080p screen, its QR loaded."""
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    context.set_default_timeout(10_000)
    try:
        shown = context.new_page()
        shown.goto(screen.url)
        _qr_loaded(shown)
        yield shown
    finally:
        context.close()


def _qr_loaded(tv: Page) -> None:
    tv.wait_for_function(
        "() => { const q = document.getElementById('qr');"
        " return !q.hidden && q.complete && q.naturalWidth > 0; }"
    )


def _decoded(tv: Page) -> list[str]:
    image = Image.open(io.BytesIO(tv.screenshot()))
    return [barcode.text for barcode in zxingcpp.read_barcodes(image)]


def test_page_qr_decodes_to_the_pay_url(tv: Page) -> None:
    """A screenshot of the whole 1080p screen decodes to exactly the payUrl, and the text
    is sized for 3 m: credits at least 12vh, the QR at least 45vh tall."""
    assert _decoded(tv) == [PAY_URL]
    expect(tv.locator("#scan")).to_have_text("scan to play")
    expect(tv.locator("#name")).to_have_text("Galaga Cabinet")
    expect(tv.locator("#state")).to_have_text("Insert coin")
    expect(tv.locator("#price")).to_have_text("1.00 USD = 2 credits")
    font_px = tv.evaluate(
        "parseFloat(getComputedStyle(document.getElementById('credits')).fontSize)"
    )
    assert font_px >= 0.12 * 1080
    box = tv.locator("#qr").bounding_box()
    assert box is not None
    assert box["height"] >= 0.45 * 1080


def test_page_updates_live_without_reload(tv: Page, agent: FakeAgent) -> None:
    """Credits, state, price and the QR follow the agent within a second, in the same page."""
    tv.evaluate("window.marker = 'still here'")
    agent.set(credits=7, state="playing")
    expect(tv.locator("#credits")).to_have_text("7", timeout=1000)
    expect(tv.locator("#state")).to_have_text("Playing", timeout=1000)
    agent.set(price={"amount": 500, "currency": "jpy"}, creditsPerPurchase=1)
    expect(tv.locator("#price")).to_have_text("500 JPY = 1 credit", timeout=1000)
    old_src = tv.locator("#qr").get_attribute("src")
    assert old_src is not None
    agent.set(payUrl=PAY_URL + "-new")
    expect(tv.locator("#qr")).not_to_have_attribute("src", old_src, timeout=1000)
    _qr_loaded(tv)
    assert _decoded(tv) == [PAY_URL + "-new"]
    assert tv.evaluate("window.marker") == "still here"


def test_page_waits_for_configuration(tv: Page, agent: FakeAgent) -> None:
    """Without a payUrl the page says it is waiting for configuration and shows no QR."""
    agent.set(payUrl=None, price=None, creditsPerPurchase=None)
    expect(tv.locator("#waiting")).to_have_text("waiting for configuration", timeout=1000)
    expect(tv.locator("#qr")).to_be_hidden()
    expect(tv.locator("#scan")).to_be_hidden()
