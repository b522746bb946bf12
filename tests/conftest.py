"""Fixtures: every storage test runs on SQLite and PostgreSQL, every MQTT test on
Mosquitto and the embedded broker. Each test gets its own schema and topic prefix."""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from insertcoin.protocol import Topics
from tests.support.chromium import browser  # noqa: F401  (the shared Chromium fixture)
from tests.support.server import ServerThread, make_settings
from tests.support.services import embedded_broker, mosquitto, postgres_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'insertcoin.db'}"
    else:
        with postgres_schema() as url:
            yield url


@dataclass(frozen=True)
class BrokerUnderTest:
    url: str
    # The embedded broker (amqtt) has no $share subscriptions.
    shared_subscriptions: bool


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerUnderTest]:
    if request.param == "mosquitto":
        (tmp_path / "mosquitto").mkdir()
        with mosquitto(tmp_path / "mosquitto") as running:
            yield BrokerUnderTest(running.url, shared_subscriptions=True)
    else:
        with embedded_broker() as url:
            yield BrokerUnderTest(url, shared_subscriptions=False)


@pytest.fixture
def broker_url(broker: BrokerUnderTest) -> str:
    return broker.url


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:8]}/machine"


@pytest.fixture
def topics(prefix: str) -> Topics:
    return Topics(prefix)


@pytest.fixture
def server(db_url: str, broker: BrokerUnderTest, prefix: str) -> Iterator[ServerThread]:
    running = ServerThread(
        make_settings(
            db_url, broker.url, prefix, mqtt_shared_subscriptions=broker.shared_subscriptions
        )
    )
    try:
        yield running
    finally:
        running.stop()
