"""QR codes and printable stickers for a cabinet's pay URL.

The QR encodes `{INSERTCOIN_PUBLIC_URL}/pay/{machineId}` with error correction M (segno
may raise it when that costs no size) and the 4-module quiet zone kept. A sticker is
A6 (105 x 148 mm): "SCAN TO PLAY", the QR large, the cabinet's name, its price and the
URL in small print. PNG and PDF are drawn with Pillow at 300 dpi using Pillow's bundled
font; SVG is written as text, in the same coordinates, for any size.

segno and Pillow are imported here only: the routes and the CLI import this module when
they need it, so neither library is loaded at server start-up.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import segno

from insertcoin.server.cabinets.models import Cabinet, format_amount

if TYPE_CHECKING:
    from PIL.ImageFont import FreeTypeFont, ImageFont

ERROR_CORRECTION = "m"
QUIET_ZONE = 4  # modules; the QR standard's minimum
STICKER_FORMATS = ("png", "svg", "pdf")
MAX_SCALE = 40

# A6 at 300 dpi, in pixels; the SVG uses the same numbers as its user units.
DPI = 300
WIDTH, HEIGHT = 1240, 1748
_MARGIN = 70
_INK = "#000000"
_GREY = "#555555"
_CUT_LINE = "#bbbbbb"

Measure = Callable[[str, int], float]


def make_qr(url: str) -> segno.QRCode:
    """The QR code of `url`: error correction M or better, never a Micro QR."""
    return segno.make_qr(url, error=ERROR_CORRECTION, boost_error=True)


def qr_svg(url: str) -> bytes:
    """The QR code of `url` as a standalone SVG document (10 px per module)."""
    out = io.BytesIO()
    make_qr(url).save(out, kind="svg", scale=10, border=QUIET_ZONE, title=url)
    return out.getvalue()


def qr_png(url: str, scale: int = 10) -> bytes:
    """The QR code of `url` as a black-and-white PNG, `scale` pixels per module."""
    if not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"scale must be 1..{MAX_SCALE}, got {scale}")
    out = io.BytesIO()
    make_qr(url).save(out, kind="png", scale=scale, border=QUIET_ZONE)
    return out.getvalue()


def sticker(cabinet: Cabinet, url: str, fmt: str) -> bytes:
    """A printable A6 sticker for `cabinet` whose QR encodes `url`; `fmt` is one of
    STICKER_FORMATS (png and pdf at 300 dpi)."""
    if fmt == "svg":
        return _sticker_svg(cabinet, url)
    if fmt in ("png", "pdf"):
        return _sticker_raster(cabinet, url, fmt)
    raise ValueError(f"unsupported sticker format {fmt!r}: use one of {', '.join(STICKER_FORMATS)}")


# --- layout, shared by the SVG and the Pillow drawing ------------------------------------


@dataclass(frozen=True)
class _Text:
    text: str
    size: int  # font size in px
    top: int  # y of the text's top
    fill: str


@dataclass(frozen=True)
class _Layout:
    qr: segno.QRCode
    qr_left: int  # where the QR's quiet zone starts
    qr_top: int
    module: int  # px per module
    texts: list[_Text]


def price_line(cabinet: Cabinet) -> str:
    """'1.00 USD', or '1.00 USD for 3 credits' when a purchase buys more than one."""
    price = format_amount(cabinet.price)
    if cabinet.credits_per_purchase > 1:
        return f"{price} for {cabinet.credits_per_purchase} credits"
    return price


def _fit(text: str, size: int, smallest: int, width: int, measure: Measure) -> tuple[str, int]:
    """Shrink `text` from `size` down to `smallest` until it fits `width`; past that, cut
    it short with '...'."""
    while size > smallest and measure(text, size) > width:
        size -= 2
    if measure(text, size) <= width:
        return text, size
    while len(text) > 1 and measure(text + "...", size) > width:
        text = text[:-1]
    return text.rstrip() + "...", size


def _layout(cabinet: Cabinet, url: str, measure: Measure) -> _Layout:
    qr = make_qr(url)
    usable = WIDTH - 2 * _MARGIN
    modules = int(qr.symbol_size(scale=1, border=QUIET_ZONE)[0])
    module = usable // modules
    side = module * modules
    texts: list[_Text] = []
    y = _MARGIN

    def add(text: str, size: int, smallest: int, fill: str, gap_after: int) -> None:
        nonlocal y
        fitted, fitted_size = _fit(text, size, smallest, usable, measure)
        texts.append(_Text(fitted, fitted_size, y, fill))
        y += fitted_size + gap_after

    add("SCAN TO PLAY", 120, 60, _INK, 10)
    qr_top = y
    y += side + 10
    add(cabinet.name, 84, 44, _INK, 28)
    add(price_line(cabinet), 96, 48, _INK, 36)
    add(url, 30, 20, _GREY, 0)
    # Centre the whole block vertically.
    shift = (HEIGHT - _MARGIN - y) // 2
    texts = [_Text(t.text, t.size, t.top + shift, t.fill) for t in texts]
    return _Layout(qr, (WIDTH - side) // 2, qr_top + shift, module, texts)


# --- SVG ----------------------------------------------------------------------------------


def _xml_text(text: str) -> str:
    """`text` escaped for XML character data, without the characters XML cannot hold."""
    cleaned = "".join(
        ch
        for ch in text
        if ch in "\t\n\r"
        or " " <= ch <= "\ud7ff"
        or "\ue000" <= ch <= "\ufffd"
        or ch >= "\U00010000"
    )
    return escape(cleaned)


def _svg_measure(text: str, size: int) -> float:
    # No font metrics in SVG: a generous average advance for a sans-serif font.
    return len(text) * size * 0.6


def _sticker_svg(cabinet: Cabinet, url: str) -> bytes:
    layout = _layout(cabinet, url, _svg_measure)
    m = layout.module
    left = layout.qr_left + QUIET_ZONE * m
    top = layout.qr_top + QUIET_ZONE * m
    path: list[str] = []
    for row, modules in enumerate(layout.qr.matrix):
        col = 0
        while col < len(modules):
            if not modules[col]:
                col += 1
                continue
            start = col
            while col < len(modules) and modules[col]:
                col += 1
            run = (col - start) * m
            path.append(f"M{left + start * m} {top + row * m}h{run}v{m}h-{run}z")
    parts = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="105mm" height="148mm" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}">',
        f"<title>{_xml_text(cabinet.name)}: scan to play</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<rect x="12" y="12" width="{WIDTH - 24}" height="{HEIGHT - 24}" rx="40" '
        f'fill="none" stroke="{_CUT_LINE}" stroke-width="3"/>',
        f'<path fill="{_INK}" shape-rendering="crispEdges" d="{"".join(path)}"/>',
    ]
    for text in layout.texts:
        # dominant-baseline is not honoured everywhere: put the baseline at ~0.8 em.
        baseline = text.top + round(text.size * 0.8)
        parts.append(
            f'<text x="{WIDTH // 2}" y="{baseline}" font-family="Helvetica, Arial, sans-serif" '
            f'font-size="{text.size}" fill="{text.fill}" text-anchor="middle">'
            f"{_xml_text(text.text)}</text>"
        )
    parts.append("</svg>\n")
    return "\n".join(parts).encode("utf-8")


# --- PNG and PDF --------------------------------------------------------------------------


@cache
def _font(size: int) -> "FreeTypeFont | ImageFont":
    from PIL import ImageFont  # noqa: PLC0415

    return ImageFont.load_default(size=size)


def _pil_measure(text: str, size: int) -> float:
    return _font(size).getlength(text)


def _sticker_raster(cabinet: Cabinet, url: str, fmt: str) -> bytes:
    from PIL import Image, ImageDraw  # noqa: PLC0415

    layout = _layout(cabinet, url, _pil_measure)
    image = Image.new("L", (WIDTH, HEIGHT), 255)
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((12, 12, WIDTH - 13, HEIGHT - 13), radius=40, outline=_CUT_LINE, width=3)
    modules = [
        [0 if dark else 255 for dark in row] for row in layout.qr.matrix_iter(border=QUIET_ZONE)
    ]
    code = Image.new("L", (len(modules[0]), len(modules)))
    code.putdata([value for row in modules for value in row])
    code = code.resize(
        (code.width * layout.module, code.height * layout.module), Image.Resampling.NEAREST
    )
    image.paste(code, (layout.qr_left, layout.qr_top))
    for text in layout.texts:
        draw.text(
            (WIDTH // 2, text.top),
            text.text,
            fill=text.fill,
            font=_font(text.size),
            anchor="mt",
        )
    out = io.BytesIO()
    if fmt == "pdf":
        # Pillow embeds the page as one JPEG: a high quality keeps text and modules crisp.
        image.save(
            out,
            format="PDF",
            resolution=float(DPI),
            quality=95,
            title=f"{cabinet.name}: scan to play",
        )
    else:
        image.save(out, format="PNG", dpi=(DPI, DPI))
    return out.getvalue()
