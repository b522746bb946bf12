"""Broker URLs: `mqtt://user:pass@host:port`, or `mqtts://` for TLS (8883 by default).

One parser for the server's INSERTCOIN_MQTT_URL and the agent's `mqtt.url`. Its reasons
never repeat the URL: it may hold a password, and they end up in logs and terminals.
"""

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    def display(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttTarget:
    """The broker a URL names; ValueError with a short reason if it names none."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a bad port") from None
    if port == 0:
        raise ValueError("has port 0: give a port from 1 to 65535, or none")
    tls = parts.scheme == "mqtts"
    return MqttTarget(
        host=parts.hostname,
        port=port if port is not None else (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )
