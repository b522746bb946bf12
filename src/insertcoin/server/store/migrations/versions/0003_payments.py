"""payments: checkouts, purchases, the Stripe event inbox; cabinets.max_quantity

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

from insertcoin.server.store.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cabinets") as batch:
        batch.add_column(
            sa.Column("max_quantity", sa.Integer(), nullable=False, server_default="10")
        )
    op.create_table(
        "checkouts",
        sa.Column("checkout_session_id", sa.String(255), nullable=False),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("unit_amount", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("credits_per_purchase", sa.Integer(), nullable=False),
        sa.Column("max_quantity", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["machine_id"],
            ["cabinets.machine_id"],
            name="fk_checkouts_machine_id_cabinets",
        ),
        sa.PrimaryKeyConstraint("checkout_session_id", name="pk_checkouts"),
    )
    op.create_table(
        "purchases",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("checkout_session_id", sa.String(255), nullable=False),
        sa.Column("payment_intent_id", sa.String(255)),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("credit_id", sa.String(64)),
        sa.Column("captured_at_payment", sa.Boolean(), nullable=False),
        sa.Column("attention_reason", sa.Text()),
        sa.Column("action", sa.String(16)),
        sa.Column("action_attempts", sa.Integer(), nullable=False),
        sa.Column("action_key_generation", sa.Integer(), nullable=False),
        sa.Column("action_due_at", UTCDateTime()),
        sa.Column("action_error", sa.Text()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["machine_id"],
            ["cabinets.machine_id"],
            name="fk_purchases_machine_id_cabinets",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_purchases"),
        sa.UniqueConstraint("checkout_session_id", name="uq_purchases_checkout_session_id"),
        sa.UniqueConstraint("credit_id", name="uq_purchases_credit_id"),
    )
    op.create_index("ix_purchases_state", "purchases", ["state"])
    op.create_index("ix_purchases_action_due_at", "purchases", ["action_due_at"])
    op.create_index("ix_purchases_machine_id_created_at", "purchases", ["machine_id", "created_at"])
    op.create_index("ix_purchases_created_at", "purchases", ["created_at"])
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("object_id", sa.String(255), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("due_at", UTCDateTime()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("processed_at", UTCDateTime()),
        sa.Column("result", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_stripe_events"),
    )
    op.create_index("ix_stripe_events_due_at", "stripe_events", ["due_at"])


def downgrade() -> None:
    op.drop_table("stripe_events")
    op.drop_table("purchases")
    op.drop_table("checkouts")
    with op.batch_alter_table("cabinets") as batch:
        batch.drop_column("max_quantity")
