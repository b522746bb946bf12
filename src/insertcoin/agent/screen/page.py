"""The attract page: one static document filled in and kept live by its own script.

Everything variable (cabinet name, payUrl, credits) reaches the page as JSON and is set
through textContent, never spliced into markup, so the template needs no escaping beyond
the embedded initial snapshot. The inline style and script are allowed by hash in the CSP.
"""

import base64
import hashlib
from typing import Any

import orjson

STYLE = """
*{box-sizing:border-box;margin:0;padding:0}
html,body{height:100%;background:#000;color:#f5f5f5;overflow:hidden;
  font-family:"DejaVu Sans","Liberation Sans",Arial,sans-serif}
main{display:flex;height:100vh;align-items:center;justify-content:space-around;padding:4vh 3vw}
#left{display:flex;flex-direction:column;align-items:center;gap:2vh}
#qrbox{height:72vh;width:72vh;background:#fff;display:flex;align-items:center;
  justify-content:center;border-radius:1.5vh}
#qr{height:100%;width:100%;image-rendering:pixelated}
#waiting{color:#ddd;font-size:5vh;text-align:center;padding:4vh}
body[data-qr=off] #qrbox{background:#1a1a1a}
#scan{font-size:7vh;font-weight:700;letter-spacing:.05em;text-transform:uppercase;color:#ffd400}
#right{display:flex;flex-direction:column;align-items:flex-start;gap:2.5vh;max-width:45vw}
#name{font-size:7vh;font-weight:700;overflow-wrap:anywhere}
#state{font-size:9vh;font-weight:800;text-transform:uppercase;color:#7CFC00}
body[data-state=playing] #state{color:#00bfff}
body[data-state=out_of_service] #state{color:#ff4040}
#credits{font-size:22vh;font-weight:800;line-height:1;font-variant-numeric:tabular-nums}
#creditslabel{font-size:5vh;color:#bbb}
#price{font-size:6vh;font-weight:700}
#link{font-size:3vh;color:#ff9d3b;min-height:3vh}
[hidden]{display:none!important}
"""

SCRIPT = """
(function () {
  "use strict";
  // Stripe's zero-decimal currencies: amounts are already whole units.
  var ZERO = "bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split(" ");
  var STATES = {attract: "Insert coin", playing: "Playing", out_of_service: "Out of service"};
  var shownPayUrl;
  function $(id) { return document.getElementById(id); }
  function money(price) {
    var cur = String(price.currency).toLowerCase();
    var amount = Number(price.amount);
    var text = ZERO.indexOf(cur) >= 0 ? String(amount) : (amount / 100).toFixed(2);
    return text + " " + cur.toUpperCase();
  }
  function hash(text) {
    // FNV-1a: only a cache-buster for qr.svg, so collisions merely cost a stale image.
    var h = 0x811c9dc5;
    for (var i = 0; i < text.length; i++) {
      h ^= text.charCodeAt(i);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h.toString(16);
  }
  function render(s) {
    document.body.dataset.state = s.state;
    document.title = (s.name || s.machineId) + " \\u2014 " + (STATES[s.state] || s.state);
    $("name").textContent = s.name || s.machineId;
    $("state").textContent = STATES[s.state] || s.state;
    $("credits").textContent = String(s.credits);
    $("creditslabel").textContent = s.credits === 1 ? "credit" : "credits";
    var configured = typeof s.payUrl === "string" && s.payUrl.length > 0;
    var open = configured && s.state !== "out_of_service";
    document.body.dataset.qr = open ? "on" : "off";
    $("qr").hidden = !open;
    $("scan").hidden = !open;
    $("waiting").hidden = open;
    $("waiting").textContent = configured ? "Out of service" : "waiting for configuration";
    if (configured && s.payUrl !== shownPayUrl) {
      $("qr").src = "qr.svg?v=" + hash(s.payUrl);
      shownPayUrl = s.payUrl;
    }
    if (s.price) {
      var per = s.creditsPerPurchase || 1;
      $("price").textContent = money(s.price) + " = " + per + (per === 1 ? " credit" : " credits");
    } else {
      $("price").textContent = "";
    }
    setLink(s.online ? "" : "offline \\u2014 new payments may be delayed");
  }
  var linkNote = "";
  var streamNote = "";
  function setLink(note) { linkNote = note; $("link").textContent = streamNote || linkNote; }
  function setStream(note) { streamNote = note; $("link").textContent = streamNote || linkNote; }
  function connect() {
    var source = new EventSource("events");
    source.onopen = function () { setStream(""); };
    source.onmessage = function (event) {
      try { render(JSON.parse(event.data)); } catch (err) { console.error(err); }
    };
    source.onerror = function () {
      setStream("reconnecting\\u2026");
      // The browser retries by itself unless the stream was refused; then we do.
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        setTimeout(connect, 2000);
      }
    };
  }
  render(JSON.parse($("initial").textContent));
  connect();
})();
"""

BODY = """<main>
<div id="left">
<div id="qrbox"><img id="qr" alt="QR code to pay" hidden><p id="waiting"></p></div>
<p id="scan" hidden>scan to play</p>
</div>
<div id="right">
<p id="name"></p>
<p id="state"></p>
<div><p id="credits"></p><p id="creditslabel"></p></div>
<p id="price"></p>
<p id="link"></p>
</div>
</main>"""


def _digest(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self'; connect-src 'self'; "
    f"style-src {_digest(STYLE)}; script-src {_digest(SCRIPT)}; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def render(snapshot: dict[str, Any]) -> bytes:
    """The page with `snapshot` embedded, so it is complete before the stream connects."""
    # "<" escaped so no value can close the data block early.
    initial = orjson.dumps(snapshot).decode().replace("<", "\\u003c")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        "<title>insertcoin</title>"
        f"<style>{STYLE}</style></head><body>{BODY}"
        f'<script type="application/json" id="initial">{initial}</script>'
        f"<script>{SCRIPT}</script></body></html>"
    ).encode()
