"""The schema. Changing it means a new Alembic revision in `migrations/versions`."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on both databases, always returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


# Integer on SQLite so the key is the rowid (autoincrement); BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

cabinets = Table(
    "cabinets",
    metadata,
    Column("machine_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("price_amount", Integer, nullable=False),
    Column("price_currency", String(3), nullable=False),
    Column("credits_per_purchase", Integer, nullable=False, default=1),
    # How many purchases one checkout may buy at once (Checkout's adjustable quantity).
    Column("max_quantity", Integer, nullable=False, default=10, server_default="10"),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The retained `config` is an outbox too: published while published < version.
    Column("config_version", Integer, nullable=False, default=1),
    Column("config_published_version", Integer, nullable=False, default=0),
)

credentials = Table(
    "cabinet_credentials",
    metadata,
    Column("machine_id", String(64), ForeignKey("cabinets.machine_id"), primary_key=True),
    # Mosquitto's PBKDF2-SHA512 format ($7$...), so the broker's password file is
    # written from here without the password ever being stored.
    Column("mqtt_password_hash", String(255), nullable=False),
    # SHA-256 of a 256-bit random token: fast to look up, useless if leaked.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
)

presence = Table(
    "cabinet_presence",
    metadata,
    Column("machine_id", String(64), ForeignKey("cabinets.machine_id"), primary_key=True),
    Column("online", Boolean, nullable=False),
    Column("state", String(32)),
    Column("credits", Integer),
    Column("agent_version", String(64)),
    Column("reported_at", UTCDateTime),
    Column("last_seen", UTCDateTime, nullable=False),
)

grants = Table(
    "grants",
    metadata,
    Column("credit_id", String(64), primary_key=True),
    Column("machine_id", String(64), ForeignKey("cabinets.machine_id"), nullable=False),
    Column("credits", Integer, nullable=False),
    Column("source", String(16), nullable=False),
    Column("reason", Text),
    Column("state", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    # NULL once final: the dispatcher's work list is `next_attempt_at <= now`.
    Column("next_attempt_at", UTCDateTime),
    Column("last_published_at", UTCDateTime),
    Column("settled_at", UTCDateTime),
    Column("settle_reason", Text),
    Index("ix_grants_next_attempt_at", "next_attempt_at"),
    Index("ix_grants_machine_id_created_at", "machine_id", "created_at"),
)

history = Table(
    "history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("subject", String(16), nullable=False),
    Column("subject_id", String(128), nullable=False),
    Column("machine_id", String(64)),
    Column("event", String(32), nullable=False),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("detail", JSON),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_history_subject_subject_id", "subject", "subject_id"),
)

gameovers = Table(
    "gameovers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("machine_id", String(64), ForeignKey("cabinets.machine_id"), nullable=False),
    Column("via", String(8), nullable=False),
    Column("credits_left", Integer),
    Column("reported_at", UTCDateTime),
    Column("received_at", UTCDateTime, nullable=False),
    Index("ix_gameovers_machine_id_received_at", "machine_id", "received_at"),
)

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Checkout Sessions this server opened, with the price it put in them: what a paid
# session is checked against (GUARANTEES G5), whatever the webhook or Stripe says.
checkouts = Table(
    "checkouts",
    metadata,
    Column("checkout_session_id", String(255), primary_key=True),
    Column("machine_id", String(64), ForeignKey("cabinets.machine_id"), nullable=False),
    Column("unit_amount", Integer, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("credits_per_purchase", Integer, nullable=False),
    Column("max_quantity", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

purchases = Table(
    "purchases",
    metadata,
    Column("id", String(40), primary_key=True),
    # One purchase per Checkout Session, whatever arrives how often (GUARANTEES G1).
    Column("checkout_session_id", String(255), nullable=False, unique=True),
    Column("payment_intent_id", String(255)),
    Column("machine_id", String(64), ForeignKey("cabinets.machine_id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("amount", Integer, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("credits", Integer, nullable=False),
    Column("credit_id", String(64), unique=True),
    # Delayed methods (bank debits) are captured by Stripe at payment: undo = refund.
    Column("captured_at_payment", Boolean, nullable=False),
    Column("attention_reason", Text),
    # A Stripe call still owed (capture, cancel, refund, release): the money outbox.
    Column("action", String(16)),
    Column("action_attempts", Integer, nullable=False, default=0),
    # Bumped after a 5xx that Stripe stored under the old key, so a retry can act.
    Column("action_key_generation", Integer, nullable=False, default=0),
    Column("action_due_at", UTCDateTime),
    Column("action_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_purchases_state", "state"),
    Index("ix_purchases_action_due_at", "action_due_at"),
    Index("ix_purchases_machine_id_created_at", "machine_id", "created_at"),
    Index("ix_purchases_created_at", "created_at"),
)

# The webhook inbox: an event is stored (durable) before Stripe gets its 200, then
# processed; the reconciler feeds missed events in here too.
stripe_events = Table(
    "stripe_events",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("type", String(64), nullable=False),
    Column("object_id", String(255), nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("via", String(16), nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    # NULL while owed; processing leases it by moving due_at ahead.
    Column("due_at", UTCDateTime),
    Column("attempts", Integer, nullable=False, default=0),
    Column("processed_at", UTCDateTime),
    Column("result", Text),
    Index("ix_stripe_events_due_at", "due_at"),
)
