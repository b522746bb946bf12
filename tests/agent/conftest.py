"""One Mosquitto and one server (SQLite) per agent test module: the agent is the subject,
and a module's agents share the server, each with cabinets of its own."""

import uuid
from collections.abc import Iterator

import pytest

from insertcoin.protocol import Topics
from tests.support.server import ServerThread, make_settings
from tests.support.services import Mosquitto, mosquitto


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with mosquitto(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


@pytest.fixture(scope="module")
def topics() -> Topics:
    return Topics(f"test/{uuid.uuid4().hex[:8]}/machine")


@pytest.fixture(scope="module")
def server(
    broker: Mosquitto, topics: Topics, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    db = tmp_path_factory.mktemp("server") / "insertcoin.db"
    running = ServerThread(make_settings(f"sqlite:///{db}", broker.url, topics.prefix))
    try:
        yield running
    finally:
        running.stop()
