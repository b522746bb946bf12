"""Typed settings from the environment and `.env` (PROTOCOL.md section 5).

Built by `load_settings()` and passed in; nothing reads the environment at import time.
The prototype's variable names are accepted as fallbacks so its `.env` works unchanged.
"""

import hashlib
import os
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from insertcoin.mqtt_url import MqttTarget, parse_mqtt_url
from insertcoin.protocol.topics import DEFAULT_PREFIX, Topics
from insertcoin.server.errors import ConfigError

DEFAULT_MQTT_HOST = "127.0.0.1"
DEFAULT_MQTT_PORT = 1883


def _env(name: str, *fallbacks: str) -> AliasChoices:
    return AliasChoices(name, *fallbacks)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, frozen=True
    )

    database_url: Annotated[str, Field(validation_alias=_env("INSERTCOIN_DATABASE_URL"))] = (
        "sqlite:///./insertcoin.db"
    )
    mqtt_url: Annotated[str | None, Field(validation_alias=_env("INSERTCOIN_MQTT_URL"))] = None
    mqtt_broker: Annotated[str | None, Field(validation_alias=_env("MQTT_BROKER"))] = None
    mqtt_port: Annotated[int | None, Field(ge=1, le=65535, validation_alias=_env("MQTT_PORT"))] = (
        None
    )
    mqtt_username: Annotated[str | None, Field(validation_alias=_env("MQTT_USERNAME"))] = None
    mqtt_password: Annotated[SecretStr | None, Field(validation_alias=_env("MQTT_PASSWORD"))] = None
    mqtt_ca_file: Annotated[
        Path | None, Field(validation_alias=_env("INSERTCOIN_MQTT_CA_FILE"))
    ] = None
    mqtt_topic_prefix: Annotated[
        str, Field(validation_alias=_env("INSERTCOIN_MQTT_TOPIC_PREFIX"))
    ] = DEFAULT_PREFIX
    # None: on for an external broker, off for the embedded one (it has no $share).
    mqtt_shared_subscriptions: Annotated[
        bool | None, Field(validation_alias=_env("INSERTCOIN_MQTT_SHARED_SUBSCRIPTIONS"))
    ] = None
    public_url: Annotated[str, Field(validation_alias=_env("INSERTCOIN_PUBLIC_URL"))] = (
        "http://127.0.0.1:8000"
    )
    admin_token: Annotated[
        SecretStr | None, Field(validation_alias=_env("INSERTCOIN_ADMIN_TOKEN"))
    ] = None
    credit_ttl_seconds: Annotated[
        float, Field(gt=0, validation_alias=_env("INSERTCOIN_CREDIT_TTL_SECONDS"))
    ] = 120.0
    credit_grace_seconds: Annotated[
        float, Field(ge=0, validation_alias=_env("INSERTCOIN_CREDIT_GRACE_SECONDS"))
    ] = 15.0
    retry_initial_seconds: Annotated[
        float, Field(gt=0, validation_alias=_env("INSERTCOIN_RETRY_INITIAL_SECONDS"))
    ] = 2.0
    retry_max_seconds: Annotated[
        float, Field(gt=0, validation_alias=_env("INSERTCOIN_RETRY_MAX_SECONDS"))
    ] = 30.0
    dispatch_interval_seconds: Annotated[
        float, Field(gt=0, validation_alias=_env("INSERTCOIN_DISPATCH_INTERVAL_SECONDS"))
    ] = 1.0
    stripe_api_key: Annotated[
        SecretStr | None,
        Field(validation_alias=_env("INSERTCOIN_STRIPE_API_KEY", "STRIPE_API_KEY")),
    ] = None
    stripe_webhook_secret: Annotated[
        SecretStr | None,
        Field(validation_alias=_env("INSERTCOIN_STRIPE_WEBHOOK_SECRET", "STRIPE_WEBHOOK_SECRET")),
    ] = None
    stripe_api_base: Annotated[
        str | None, Field(validation_alias=_env("INSERTCOIN_STRIPE_API_BASE"))
    ] = None
    # Below Stripe's own 80 s: a hung call is re-read and retried sooner.
    stripe_timeout_seconds: Annotated[
        float, Field(gt=0, validation_alias=_env("INSERTCOIN_STRIPE_TIMEOUT_SECONDS"))
    ] = 20.0
    reconcile_interval_seconds: Annotated[
        float, Field(gt=0, validation_alias=_env("INSERTCOIN_RECONCILE_INTERVAL_SECONDS"))
    ] = 300.0
    # A flood of scans must not open a flood of Checkout Sessions.
    pay_rate_per_client: Annotated[
        float, Field(gt=0, validation_alias=_env("INSERTCOIN_PAY_RATE_PER_CLIENT"))
    ] = 10.0
    pay_rate_per_cabinet: Annotated[
        float, Field(gt=0, validation_alias=_env("INSERTCOIN_PAY_RATE_PER_CABINET"))
    ] = 30.0

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
            raise ValueError("use sqlite:///path.db or postgresql://user@host/db")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _valid_mqtt_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_mqtt_url(value)
        return value

    @field_validator("mqtt_topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        Topics(value)
        return value

    @field_validator("public_url")
    @classmethod
    def _valid_public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("stripe_api_base")
    @classmethod
    def _valid_api_base(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"must be an http(s) URL, got {value!r}")
            return value.rstrip("/")
        return value

    @property
    def payments_mode(self) -> str:
        """`simulated` (no key: the built-in Stripe stand-in), `stripe-test` or `stripe-live`."""
        if self.stripe_api_key is None:
            return "simulated"
        key = self.stripe_api_key.get_secret_value()
        return "stripe-live" if key.startswith(("sk_live_", "rk_live_")) else "stripe-test"

    @property
    def sqlalchemy_url(self) -> str:
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite:")

    def mqtt_target(self) -> MqttTarget | None:
        """The configured broker, or None: use 127.0.0.1:1883, else start the embedded one."""
        if self.mqtt_url:
            return parse_mqtt_url(self.mqtt_url)
        if self.mqtt_broker:
            port = self.mqtt_port or DEFAULT_MQTT_PORT
            return MqttTarget(
                host=self.mqtt_broker,
                port=port,
                username=self.mqtt_username,
                password=self.mqtt_password.get_secret_value() if self.mqtt_password else None,
                tls=port == 8883,
            )
        return None

    def share_group(self) -> str:
        """The shared-subscription group of the server fleet.

        Brokers let any client join any share group, and then round-robin the fleet's
        acks to it. A group named after the server's own MQTT secret cannot be guessed
        by a cabinet, so a cabinet cannot take acks away from the servers.
        """
        target = self.mqtt_target()
        if target is None or not target.password:
            return "insertcoin"
        secret = f"{target.username}:{target.password}".encode()
        return f"insertcoin-{hashlib.sha256(secret).hexdigest()[:16]}"

    def ca_file(self) -> Path | None:
        if self.mqtt_ca_file is not None:
            return self.mqtt_ca_file
        legacy = Path("ca.crt")
        return legacy if legacy.is_file() else None

    def topics(self) -> Topics:
        return Topics(self.mqtt_topic_prefix)

    def pay_url(self, machine_id: str) -> str:
        return f"{self.public_url}/pay/{machine_id}"


_ENV_NAMES = {
    name: (
        field.validation_alias.choices[0]
        if isinstance(field.validation_alias, AliasChoices)
        else name
    )
    for name, field in Settings.model_fields.items()
}


def load_settings(**overrides: object) -> Settings:
    """Read settings; raise ConfigError with one line naming the variable to fix."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        name = _ENV_NAMES.get(field, field)
        raise ConfigError(f"{name}: {err['msg'].removeprefix('Value error, ')}") from None
    if settings.payments_mode != "simulated" and settings.stripe_webhook_secret is None:
        raise ConfigError(
            "INSERTCOIN_STRIPE_WEBHOOK_SECRET: required with a Stripe key (the endpoint's "
            "whsec_... signing secret from the Stripe dashboard)"
        )
    if settings.payments_mode == "stripe-live" and not settings.public_url.startswith("https://"):
        raise ConfigError(
            "INSERTCOIN_PUBLIC_URL: a live Stripe key needs an https:// public URL "
            f"(got {settings.public_url})"
        )
    ca = settings.ca_file()
    if ca is not None and not (ca.is_file() and os.access(ca, os.R_OK)):
        raise ConfigError(f"INSERTCOIN_MQTT_CA_FILE: cannot read {ca}")
    return settings
