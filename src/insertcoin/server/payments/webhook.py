"""Stripe webhooks: verify the signature on the raw body, then read just enough of the
event to store it (id, type, the session it is about). Nothing in the body is trusted
beyond that: processing re-reads the session from Stripe."""

from dataclasses import dataclass

import orjson

from insertcoin.server.errors import InsertcoinError
from insertcoin.server.payments import inbox
from insertcoin.server.payments.gateway import StripeGateway


class BadEvent(InsertcoinError):
    """A signed body that is not a usable Stripe event."""


@dataclass(frozen=True)
class Ignored:
    type: str


def parse(
    gateway: StripeGateway, payload: bytes, signature: str | None, secret: str
) -> inbox.InboxEvent | Ignored:
    """Verify and parse; raises BadSignature or BadEvent (both mean 400, no effect)."""
    gateway.verify(payload, signature, secret)
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadEvent("body is not JSON") from None
    if not isinstance(event, dict):
        raise BadEvent("body is not a JSON object")
    event_id, kind, created = event.get("id"), event.get("type"), event.get("created")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 255:
        raise BadEvent("event has no id")
    if not isinstance(kind, str):
        raise BadEvent("event has no type")
    if kind not in inbox.HANDLED:
        return Ignored(kind)
    obj = (event.get("data") or {}).get("object") if isinstance(event.get("data"), dict) else None
    object_id = obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(object_id, str) or not object_id.startswith("cs_") or len(object_id) > 255:
        raise BadEvent("event carries no Checkout Session id")
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created < 2**63:
        raise BadEvent("event has no created time, or an impossible one")
    return inbox.InboxEvent(event_id, kind, object_id, created)
