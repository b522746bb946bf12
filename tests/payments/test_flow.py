"""The paid path end to end: scan, pay, webhook, grant, ack, capture."""

import pytest

from insertcoin.protocol import Topics
from tests.support.cabinet import FakeCabinets
from tests.support.payments import Shop
from tests.support.server import add_cabinet


def test_paid_purchase_is_credited_once_and_captured(
    shop: Shop, broker_url: str, topics: Topics
) -> None:
    """A player pays for 3 credits on an online cabinet: the cabinet gets one coinpulse of
    3 credits, acks it, and only then is the authorization captured (purchase credited)."""
    add_cabinet(shop.admin, "pay1")
    cabinets = FakeCabinets(broker_url, topics, ["pay1"]).start()
    try:
        shop.server.runtime.registry.get("pay1")  # exists
        assert cabinets.wait_for(lambda c: True)
        _wait_online(shop, "pay1")
        session_id = shop.buy("pay1", quantity=3)
        purchase = shop.wait_state(session_id, {"credited"})
        assert cabinets.wait_for(lambda c: c.credits["pay1"] == 3)
        assert purchase["credits"] == 3
        assert purchase["amount"] == 300
        intent = shop.payment_intent(purchase["paymentIntentId"])
        assert intent.status == "succeeded"
        assert intent.amount_received == 300
        assert [h["event"] for h in purchase["history"]][:1] == ["created"]
        assert list(cabinets.applied.values()) == [3]
    finally:
        cabinets.stop()


def _wait_online(shop: Shop, machine_id: str) -> None:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + 10
    while not shop.server.runtime.registry.get(machine_id).online:
        if time.monotonic() > deadline:
            pytest.fail(f"{machine_id} never came online")
        time.sleep(0.05)
