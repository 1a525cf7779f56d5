"""The usage ledger: per writer, tenant, model and minute (adapters_registry.usage).

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_minutes",
        sa.Column("writer", sa.String(100), primary_key=True),
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(300), primary_key=True),
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        *(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0") for name in (
            "requests_2xx", "requests_4xx", "requests_5xx", "aborted", "prompt_tokens",
            "completion_tokens")),
    )
    op.create_index("ix_usage_minutes_minute", "usage_minutes", ["minute"])


def downgrade() -> None:
    op.drop_index("ix_usage_minutes_minute", table_name="usage_minutes")
    op.drop_table("usage_minutes")
