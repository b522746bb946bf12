"""Payment tests run on SQLite and PostgreSQL, on Mosquitto and the embedded broker."""

from collections.abc import Iterator

import pytest

from tests.conftest import BrokerUnderTest
from tests.support.payments import Shop


@pytest.fixture
def shop(db_url: str, broker: BrokerUnderTest, prefix: str) -> Iterator[Shop]:
    running = Shop(db_url, broker.url, prefix, shared=broker.shared_subscriptions)
    try:
        yield running
    finally:
        running.stop()
