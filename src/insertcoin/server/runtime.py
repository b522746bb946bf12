"""The long-lived parts of a server process, wired together and started in order:
database (migrated), broker (external or embedded), listener, MQTT link, dispatcher."""

import structlog

from insertcoin.mqtt_url import MqttTarget
from insertcoin.protocol.topics import TopicKind
from insertcoin.server.admin import AdminToken
from insertcoin.server.cabinets.registry import CabinetRegistry
from insertcoin.server.delivery.dispatcher import Dispatcher
from insertcoin.server.delivery.embedded_broker import EmbeddedBroker, is_listening
from insertcoin.server.delivery.events import CabinetEvents
from insertcoin.server.delivery.listener import Listener
from insertcoin.server.delivery.mqtt import MqttLink
from insertcoin.server.delivery.service import DeliveryService, schedule_of
from insertcoin.server.metrics import Metrics
from insertcoin.server.payments.service import Payments
from insertcoin.server.settings import DEFAULT_MQTT_HOST, DEFAULT_MQTT_PORT, Settings
from insertcoin.server.store.database import open_database, upgrade

log = structlog.get_logger(__name__)

EMBEDDED = "embedded"


def resolve_broker(settings: Settings) -> tuple[MqttTarget, str]:
    """Where the MQTT link connects, and how that was chosen: "configured", "found
    listening locally" or "embedded" (nothing answers on 127.0.0.1:1883: start our own)."""
    target = settings.mqtt_target()
    if target is not None:
        return target, "configured"
    local = MqttTarget(DEFAULT_MQTT_HOST, DEFAULT_MQTT_PORT, None, None, tls=False)
    if is_listening(DEFAULT_MQTT_HOST, DEFAULT_MQTT_PORT):
        return local, "found listening locally"
    return local, EMBEDDED


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.topics()
        self.db = open_database(settings.sqlalchemy_url)
        self.metrics = Metrics(self.db)
        self.registry = CabinetRegistry(self.db, settings)
        schedule = schedule_of(settings)
        # The dispatcher is built below and publishes for payments too: bind late.
        self.payments = Payments(
            settings,
            self.db,
            schedule,
            send=lambda pulse: self.dispatcher.send(pulse),  # noqa: PLW0108
        )
        self.events = CabinetEvents(self.db, self.metrics, self.payments)
        self.listener = Listener(self.topics, self.events)
        self.broker: EmbeddedBroker | None = None
        self.admin: AdminToken | None = None
        target, self._broker_kind = resolve_broker(settings)
        self._embedded = self._broker_kind == EMBEDDED
        shared = settings.mqtt_shared_subscriptions
        self.shared_subscriptions = (not self._embedded) if shared is None else shared
        self.link = MqttLink(
            target,
            subscriptions=self._subscriptions(),
            on_message=self.listener.submit,
            # The dispatcher is built below and needs the link: bind late.
            on_connect=lambda: self.dispatcher.broker_connected(),  # noqa: PLW0108
            ca_file=settings.ca_file(),
        )
        self.dispatcher = Dispatcher(
            self.db,
            self.link,
            self.topics,
            schedule=schedule,
            interval=settings.dispatch_interval_seconds,
            config_of=self.registry.config_message,
            follower=self.payments,
        )
        self.delivery = DeliveryService(self.db, schedule, self.dispatcher.send)

    def _subscriptions(self) -> list[str]:
        # Acks and game overs are handled once per fleet; statuses are idempotent and
        # retained, so every process takes them plainly (shared subs get no retained).
        once = [TopicKind.ACK, TopicKind.GAMEOVER]
        if self.shared_subscriptions:
            group = self.settings.share_group()
            topics = [self.topics.shared(kind, group) for kind in once]
        else:
            topics = [self.topics.wildcard(kind) for kind in once]
        return [*topics, self.topics.wildcard(TopicKind.STATUS)]

    @property
    def broker_description(self) -> str:
        return f"{self.link.target.display()} ({self._broker_kind})"

    def start(self, *, connect_timeout: float = 10.0) -> None:
        upgrade(self.db)
        self.admin = AdminToken.load(self.db, self.settings)
        if self._embedded:
            self.broker = EmbeddedBroker(DEFAULT_MQTT_HOST, DEFAULT_MQTT_PORT)
            self.broker.start()
        else:
            log.info("using_broker", broker=self.link.target.display())
        self.listener.start()
        self.delivery.start()
        self.link.start()
        if not self.link.wait_connected(connect_timeout):
            log.warning("mqtt_not_connected_yet", broker=self.link.target.display())
        self.dispatcher.start()
        self.payments.start()

    def stop(self) -> None:
        self.payments.stop()
        self.dispatcher.stop()
        self.delivery.stop()
        self.link.stop()
        self.listener.stop()
        if self.broker is not None:
            self.broker.stop()
        self.db.dispose()
