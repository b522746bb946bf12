"""QR codes, stickers and the seed-compatible `POST /create-payment-link` (PROTOCOL.md §4,
§6): every image decodes to exactly the cabinet's pay URL, and the link route creates
nothing and refuses bad bodies."""

import io
import os
import re
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zxingcpp
from PIL import Image, ImageDraw

from insertcoin.server.cabinets import qr
from insertcoin.server.cabinets.models import Cabinet, CabinetPrice
from tests.support.server import ServerThread, add_cabinet, make_settings
from tests.support.services import embedded_broker

PUBLIC_URL = "https://arcade.example.com"
SVG = "{http://www.w3.org/2000/svg}"


def _parse_svg(data: bytes) -> ET.Element:
    return ET.fromstring(data)  # noqa: S314  (our own output, not untrusted input)


def _decode(image: Image.Image) -> list[str]:
    return [barcode.text for barcode in zxingcpp.read_barcodes(image.convert("L"))]


def _cabinet(name: str = "Pac-Man", credits_per_purchase: int = 1) -> Cabinet:
    return Cabinet(
        machine_id="pacman1",
        name=name,
        enabled=True,
        price=CabinetPrice(amount=150, currency="usd"),
        credits_per_purchase=credits_per_purchase,
        max_quantity=10,
        pay_url=f"{PUBLIC_URL}/pay/pacman1",
        online=False,
        state=None,
        credits=None,
        last_seen=None,
    )


# --- the HTTP routes (one server for the module: SQLite, embedded broker) ----------------


@pytest.fixture(scope="module")
def qr_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    db = tmp_path_factory.mktemp("qr") / "insertcoin.db"
    with embedded_broker() as broker_url:
        running = ServerThread(
            make_settings(
                f"sqlite:///{db}",
                broker_url,
                f"test/{uuid.uuid4().hex[:8]}/machine",
                public_url=PUBLIC_URL,
                mqtt_shared_subscriptions=False,
            )
        )
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
def cabinet_id(qr_server: ServerThread) -> str:
    machine_id = f"qr-{uuid.uuid4().hex[:8]}"
    add_cabinet(qr_server.admin, machine_id)
    return machine_id


def test_qr_png_route_decodes_to_the_pay_url(qr_server: ServerThread, cabinet_id: str):
    """`GET /cabinets/{id}/qr.png` is a cacheable PNG whose QR decodes to exactly
    `{INSERTCOIN_PUBLIC_URL}/pay/{id}`, at the default and at a chosen scale."""
    for query, side in (("", None), ("?scale=4", 4)):
        response = httpx.get(f"{qr_server.url}/cabinets/{cabinet_id}/qr.png{query}")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"] == "public, max-age=3600"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "PNG"
        assert _decode(image) == [f"{PUBLIC_URL}/pay/{cabinet_id}"]
        if side is not None:
            assert image.width % side == 0  # whole pixels per module, quiet zone included


def test_qr_svg_route_is_an_svg_document(qr_server: ServerThread, cabinet_id: str):
    """`GET /cabinets/{id}/qr.svg` is a cacheable, well-formed SVG document."""
    response = httpx.get(f"{qr_server.url}/cabinets/{cabinet_id}/qr.svg")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("image/svg+xml")
    assert response.headers["cache-control"] == "public, max-age=3600"
    root = _parse_svg(response.content)
    assert root.tag == f"{SVG}svg"
    assert root.find(f"{SVG}path") is not None


@pytest.mark.parametrize("image", ["qr.svg", "qr.png"])
def test_qr_routes_refuse_unknown_and_malformed_cabinets(qr_server: ServerThread, image: str):
    """An unknown cabinet is a JSON 404, a malformed id or scale a 422; never an image."""
    unknown = httpx.get(f"{qr_server.url}/cabinets/ghost/{image}")
    assert unknown.status_code == 404
    assert "ghost" in unknown.json()["detail"]
    malformed = httpx.get(f"{qr_server.url}/cabinets/bad%20id/{image}")
    assert malformed.status_code == 422
    assert malformed.json()["detail"]
    if image == "qr.png":
        add_cabinet(qr_server.admin, "scaled")
        for scale in ("0", "41", "big"):
            bad = httpx.get(f"{qr_server.url}/cabinets/scaled/qr.png?scale={scale}")
            assert bad.status_code == 422, scale


def test_create_payment_link_answers_the_stable_pay_url(qr_server: ServerThread, cabinet_id: str):
    """`POST /create-payment-link` (no auth) answers the cabinet's pay URL and the absolute
    URLs of its QR images, which decode to that URL; `quantity` is passed on as a query
    parameter (up to the cabinet's maxQuantity); repeating the call gives the same answer."""
    pay_url = f"{PUBLIC_URL}/pay/{cabinet_id}"
    first = httpx.post(f"{qr_server.url}/create-payment-link", json={"machine_id": cabinet_id})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body == {
        "url": pay_url,
        "qr_svg": f"{PUBLIC_URL}/cabinets/{cabinet_id}/qr.svg",
        "qr_png": f"{PUBLIC_URL}/cabinets/{cabinet_id}/qr.png",
        "machineId": cabinet_id,
    }
    again = httpx.post(f"{qr_server.url}/create-payment-link", json={"machine_id": cabinet_id})
    assert again.json() == body

    # The image URLs are served by this server (PUBLIC_URL is where it would be reachable).
    png = httpx.get(qr_server.url + body["qr_png"].removeprefix(PUBLIC_URL))
    assert _decode(Image.open(io.BytesIO(png.content))) == [pay_url]
    svg = httpx.get(qr_server.url + body["qr_svg"].removeprefix(PUBLIC_URL))
    assert _parse_svg(svg.content).tag == f"{SVG}svg"

    with_quantity = httpx.post(
        f"{qr_server.url}/create-payment-link",
        json={"machine_id": cabinet_id, "quantity": 3, "unknown_key": "ignored"},
    )
    assert with_quantity.status_code == 200, with_quantity.text
    assert with_quantity.json()["url"] == f"{pay_url}?quantity=3"
    assert with_quantity.json()["qr_png"] == body["qr_png"]

    # At most the cabinet's maxQuantity (10 unless set otherwise) in one purchase.
    at_most = httpx.post(
        f"{qr_server.url}/create-payment-link", json={"machine_id": cabinet_id, "quantity": 10}
    )
    assert at_most.json()["url"] == f"{pay_url}?quantity=10"
    too_many = httpx.post(
        f"{qr_server.url}/create-payment-link", json={"machine_id": cabinet_id, "quantity": 11}
    )
    assert too_many.status_code == 422
    assert "maxQuantity 10" in too_many.json()["detail"]


def test_create_payment_link_for_an_unknown_cabinet_is_404(qr_server: ServerThread):
    """An unknown cabinet gets a JSON 404 that names it."""
    response = httpx.post(f"{qr_server.url}/create-payment-link", json={"machine_id": "ghost"})
    assert response.status_code == 404
    assert "ghost" in response.json()["detail"]


BAD_BODIES: list[Any] = [
    pytest.param({"json": {}}, id="missing-machine-id"),
    pytest.param({"json": {"quantity": 1}}, id="only-quantity"),
    pytest.param({"json": {"machine_id": 7}}, id="machine-id-not-a-string"),
    pytest.param({"json": {"machine_id": None}}, id="machine-id-null"),
    pytest.param({"json": {"machine_id": "bad id"}}, id="machine-id-pattern"),
    pytest.param({"json": {"machine_id": "x/#"}}, id="machine-id-topic-chars"),
    pytest.param({"json": {"machine_id": "a" * 65}}, id="machine-id-too-long"),
    pytest.param({"json": {"machine_id": "{id}", "quantity": 0}}, id="quantity-zero"),
    pytest.param({"json": {"machine_id": "{id}", "quantity": 101}}, id="quantity-too-big"),
    pytest.param({"json": {"machine_id": "{id}", "quantity": -1}}, id="quantity-negative"),
    pytest.param({"json": {"machine_id": "{id}", "quantity": "3"}}, id="quantity-string"),
    pytest.param({"json": {"machine_id": "{id}", "quantity": 1.5}}, id="quantity-float"),
    pytest.param({"json": {"machine_id": "{id}", "quantity": True}}, id="quantity-bool"),
    pytest.param({"json": ["{id}"]}, id="json-array"),
    pytest.param({"json": "{id}"}, id="json-string"),
    pytest.param(
        {"content": b"machine_id={id", "headers": {"content-type": "application/json"}},
        id="not-json",
    ),
    pytest.param(
        {"content": b"machine_id={id}", "headers": {"content-type": "text/plain"}},
        id="form-like-text",
    ),
    pytest.param({}, id="no-body"),
]


def _with_id(value: Any, machine_id: str) -> Any:
    if isinstance(value, str):
        return value.replace("{id}", machine_id)
    if isinstance(value, bytes):
        return value.replace(b"{id}", machine_id.encode())
    if isinstance(value, dict):
        return {k: _with_id(v, machine_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_id(v, machine_id) for v in value]
    return value


@pytest.mark.parametrize("request_kwargs", BAD_BODIES)
def test_create_payment_link_refuses_bad_bodies(
    qr_server: ServerThread, cabinet_id: str, request_kwargs: dict[str, Any]
):
    """A missing or mistyped field, a malformed id, a quantity outside 1..100 or a body
    that is not a JSON object: 422 with a reason, and the cabinets are left as they were."""
    before = qr_server.admin.get("/api/cabinets").json()
    response = httpx.post(
        f"{qr_server.url}/create-payment-link", **_with_id(request_kwargs, cabinet_id)
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
    assert qr_server.admin.get("/api/cabinets").json() == before


def test_server_start_up_loads_no_image_library():
    """Importing the app and the CLI loads neither segno nor Pillow: the QR module is
    imported only when a QR route or command runs."""
    code = (
        "import sys, insertcoin.server.app, insertcoin.cli\n"
        "print(sorted(m for m in ('segno', 'PIL') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


# --- the sticker ---------------------------------------------------------------------------


def test_png_sticker_is_a6_at_300_dpi_and_decodes_to_the_url():
    """The PNG sticker is A6 (105 x 148 mm) at 300 dpi and its QR decodes to the URL."""
    cabinet = _cabinet()
    image = Image.open(io.BytesIO(qr.sticker(cabinet, cabinet.pay_url, "png")))
    assert image.format == "PNG"
    assert image.size == (1240, 1748)
    assert [round(d) for d in image.info["dpi"]] == [300, 300]
    assert _decode(image) == [cabinet.pay_url]


def test_pdf_sticker_is_one_a6_page_whose_qr_decodes_to_the_url():
    """The PDF sticker is a valid PDF with one A6 page; the page image's QR decodes."""
    cabinet = _cabinet(credits_per_purchase=3)
    data = qr.sticker(cabinet, cabinet.pay_url, "pdf")
    assert data.startswith(b"%PDF-")
    assert data.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page\b", data)) == 1
    media_box = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", data)
    assert media_box is not None
    width_mm, height_mm = (float(v) / 72 * 25.4 for v in media_box.groups())
    assert (round(width_mm), round(height_mm)) == (105, 148)
    # Pillow embeds the page as a single JPEG stream: decode the QR from it.
    start = data.index(b"\xff\xd8\xff")
    page = Image.open(io.BytesIO(data[start : data.index(b"endstream", start)]))
    assert _decode(page) == [cabinet.pay_url]


def _rasterize_svg_paths(root: ET.Element) -> Image.Image:
    """Draw the sticker's QR path (only `M x y h w v h h -w z` runs, as qr.py writes it)."""
    width, height = (int(v) for v in root.attrib["viewBox"].split()[2:])
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    for path in root.iter(f"{SVG}path"):
        for x, y, w, h in re.findall(r"M(\d+) (\d+)h(\d+)v(\d+)h-\d+z", path.attrib["d"]):
            left, top = int(x), int(y)
            draw.rectangle((left, top, left + int(w) - 1, top + int(h) - 1), fill=0)
    return image


def test_svg_sticker_escapes_the_name_and_its_qr_decodes_to_the_url():
    """The SVG sticker is well-formed even for a name with markup characters, shows the
    name verbatim, the price as money with the credits per purchase, and "scan to play",
    and its QR path, drawn, decodes to the URL."""
    name = 'Pac & <script>alert("x")</script>'
    cabinet = _cabinet(name=name, credits_per_purchase=3)
    data = qr.sticker(cabinet, cabinet.pay_url, "svg")
    assert b"<script>" not in data
    root = _parse_svg(data)
    assert root.tag == f"{SVG}svg"
    assert (root.attrib["width"], root.attrib["height"]) == ("105mm", "148mm")
    texts = [element.text for element in root.iter(f"{SVG}text")]
    assert name in texts
    assert "1.50 USD for 3 credits" in texts
    assert any(text and text.lower() == "scan to play" for text in texts)
    assert _decode(_rasterize_svg_paths(root)) == [cabinet.pay_url]


def test_sticker_shows_a_single_credit_price_alone_and_shortens_long_names():
    """With one credit per purchase the price is just money ('1.50 USD'); a name too long
    for the sticker is cut short with '...' rather than running off the edge."""
    long_name = "Galaxian " * 30
    data = qr.sticker(_cabinet(name=long_name), f"{PUBLIC_URL}/pay/pacman1", "svg")
    texts = [element.text or "" for element in _parse_svg(data).iter(f"{SVG}text")]
    assert "1.50 USD" in texts
    [shortened] = [text for text in texts if text.startswith("Galaxian")]
    assert shortened.endswith("...")
    assert len(shortened) < len(long_name)


def test_unsupported_sticker_format_and_scale_are_refused():
    """Only png, svg and pdf stickers exist; a PNG QR's scale is bounded."""
    cabinet = _cabinet()
    with pytest.raises(ValueError, match="png, svg, pdf"):
        qr.sticker(cabinet, cabinet.pay_url, "jpg")
    with pytest.raises(ValueError, match="scale"):
        qr.qr_png(cabinet.pay_url, 0)


# --- the CLI ------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("INSERTCOIN_", "MQTT_", "STRIPE_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "insertcoin", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_writes_stickers_that_decode_to_the_pay_url(tmp_path: Path):
    """`cabinet qr ID -o FILE` writes a PNG, PDF or SVG sticker for a cabinet added with
    `cabinet add`, says where, and its QR decodes to `{INSERTCOIN_PUBLIC_URL}/pay/ID`."""
    env = {
        "INSERTCOIN_DATABASE_URL": f"sqlite:///{tmp_path / 'insertcoin.db'}",
        "INSERTCOIN_PUBLIC_URL": PUBLIC_URL,
    }
    added = _cli(
        "cabinet", "add", "pacman1", "--name", "Pac-Man", "--price", "1.50",
        "--credits-per-purchase", "3", cwd=tmp_path, **env,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    pay_url = f"{PUBLIC_URL}/pay/pacman1"

    for ext in ("png", "pdf", "svg"):
        out = tmp_path / "stickers" / f"pacman1.{ext}"
        out.parent.mkdir(exist_ok=True)
        result = _cli("cabinet", "qr", "pacman1", "-o", str(out), cwd=tmp_path, **env)
        assert result.returncode == 0, result.stderr
        assert str(out) in result.stdout
        assert result.stderr == ""  # the public URL is set: no warning
        data = out.read_bytes()
        if ext == "png":
            assert _decode(Image.open(out)) == [pay_url]
        elif ext == "pdf":
            assert data.startswith(b"%PDF-")
            assert re.search(rb"/Type\s*/Page\b", data)
        else:
            texts = [e.text for e in _parse_svg(data).iter(f"{SVG}text")]
            assert "Pac-Man" in texts
            assert "1.50 USD for 3 credits" in texts


def test_cli_refuses_unknown_cabinets_and_formats(tmp_path: Path):
    """An unknown cabinet or an unsupported extension ends in one clear error line (the
    latter naming the supported ones), a non-zero exit, and no file; without
    INSERTCOIN_PUBLIC_URL the sticker is written but a warning says to set it."""
    env = {"INSERTCOIN_DATABASE_URL": f"sqlite:///{tmp_path / 'insertcoin.db'}"}
    added = _cli("cabinet", "add", "c1", "--name", "C", "--price", "1", cwd=tmp_path, **env)
    assert added.returncode == 0, added.stderr

    unknown = _cli("cabinet", "qr", "ghost", "-o", str(tmp_path / "g.png"), cwd=tmp_path, **env)
    assert "ghost" in _one_error_line(unknown)
    assert not (tmp_path / "g.png").exists()

    jpeg = _cli("cabinet", "qr", "c1", "-o", str(tmp_path / "c1.jpg"), cwd=tmp_path, **env)
    line = _one_error_line(jpeg)
    assert all(ext in line for ext in (".png", ".svg", ".pdf"))
    assert not (tmp_path / "c1.jpg").exists()

    default_url = _cli("cabinet", "qr", "c1", "-o", str(tmp_path / "c1.png"), cwd=tmp_path, **env)
    assert default_url.returncode == 0, default_url.stderr
    assert "INSERTCOIN_PUBLIC_URL" in default_url.stderr
    assert _decode(Image.open(tmp_path / "c1.png")) == ["http://127.0.0.1:8000/pay/c1"]
