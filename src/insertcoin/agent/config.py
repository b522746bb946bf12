"""The cabinet's TOML file (PROTOCOL.md section 7), checked strictly at start.

A typo in a key would otherwise silently fall back to a default on a machine nobody is
watching, so unknown keys and bad values stop the agent with one line naming the key.
"""

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

from insertcoin.mqtt_url import MqttTarget, parse_mqtt_url
from insertcoin.protocol import ProtocolError, Topics
from insertcoin.protocol.ids import is_machine_id
from insertcoin.protocol.messages import describe
from insertcoin.protocol.topics import DEFAULT_PREFIX


class ConfigError(Exception):
    """One line, naming the key: what the operator reads instead of a traceback.

    Not a ValueError, so msgspec lets it out of `__post_init__` unwrapped."""


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class MqttConfig(_Strict, frozen=True, kw_only=True):
    url: str
    ca_file: str | None = None
    # Not in the section 7 sample: only for a server whose topic prefix is not the default.
    topic_prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        # Raised as ConfigError directly so the message can name the exact key.
        try:
            target = self.target
        except ValueError as exc:
            raise ConfigError(f"mqtt.url: {exc}") from None
        if self.ca_file is not None:
            if not target.tls:
                raise ConfigError("mqtt.ca_file: only used with an mqtts:// url")
            if not Path(self.ca_file).is_file():
                raise ConfigError(f"mqtt.ca_file: no such file {self.ca_file!r}")
        try:
            Topics(self.topic_prefix)
        except ProtocolError as exc:
            raise ConfigError(f"mqtt.topic_prefix: {exc}") from None

    @property
    def target(self) -> MqttTarget:
        return parse_mqtt_url(self.url)


class JournalConfig(_Strict, frozen=True, kw_only=True):
    path: str


class CoinConfig(_Strict, frozen=True, kw_only=True):
    mode: Literal["pulse", "session"] = "pulse"
    output: Literal["gpio", "keyboard", "command", "simulated"]
    pulses_per_credit: Annotated[int, Meta(ge=1, le=100)] = 1
    pulse_ms: Annotated[int, Meta(ge=1, le=10_000)] = 100
    gap_ms: Annotated[int, Meta(ge=1, le=10_000)] = 150
    pin: Annotated[int, Meta(ge=0, le=27)] | None = None
    active_high: bool = True
    key: Annotated[str, Meta(pattern=r"^KEY_[A-Z0-9_]+\Z")] = "KEY_5"
    command: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)] | None = None


class GameOverConfig(_Strict, frozen=True, kw_only=True):
    source: Literal["http", "process", "gpio", "none"] = "http"
    # Not in the section 7 sample, which names no input pin: only for source = "gpio".
    pin: Annotated[int, Meta(ge=0, le=27)] | None = None
    # Not in the section 7 sample: the game to launch per credit, for source = "process".
    command: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)] | None = None


class ScreenConfig(_Strict, frozen=True, kw_only=True):
    listen: str = "127.0.0.1:8765"


class AgentConfig(_Strict, frozen=True, kw_only=True):
    machine_id: str
    mqtt: MqttConfig
    journal: JournalConfig
    coin: CoinConfig
    gameover: GameOverConfig = field(default_factory=GameOverConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)

    def __post_init__(self) -> None:
        # Raised as ConfigError directly so the message can name the exact key.
        if not is_machine_id(self.machine_id):
            raise ConfigError("machine_id: use 1-64 characters from A-Z a-z 0-9 _ -")
        if self.coin.output == "gpio" and self.coin.pin is None:
            raise ConfigError('coin.pin: required when coin.output is "gpio"')
        if self.coin.output == "command" and self.coin.command is None:
            raise ConfigError('coin.command: required when coin.output is "command"')
        if self.gameover.source == "gpio" and self.gameover.pin is None:
            raise ConfigError('gameover.pin: required when gameover.source is "gpio"')
        if self.gameover.source == "process":
            if self.gameover.command is None:
                raise ConfigError('gameover.command: required when gameover.source is "process"')
            if self.coin.mode != "session":
                # Pulse mode hands every credit over at once: no game to launch per credit.
                raise ConfigError('gameover.source: "process" needs coin.mode = "session"')
        if self.gameover.pin is not None and self.gameover.pin == self.coin.pin:
            raise ConfigError("gameover.pin: must differ from coin.pin")
        _split_listen(self.screen.listen)


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f'screen.listen: must be "host:port", got {listen!r}')
    return host.strip("[]"), int(port)


def listen_address(config: AgentConfig) -> tuple[str, int]:
    return _split_listen(config.screen.listen)


def parse_config(data: dict[str, Any]) -> AgentConfig:
    try:
        return msgspec.convert(data, AgentConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(describe(exc, AgentConfig, "config")) from None


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_config(data)
