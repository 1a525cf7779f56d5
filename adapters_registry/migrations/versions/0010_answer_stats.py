"""Each version's answer figures beside the bill: times to first token, latencies,
refusals and shadow comparisons per writer, tenant, model and minute (rollout evidence).

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "answer_stats_minutes",
        sa.Column("writer", sa.String(100), primary_key=True),
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(300), primary_key=True),
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("stats", sa.JSON(), nullable=False),
    )
    op.create_index("ix_answer_stats_minutes_minute", "answer_stats_minutes", ["minute"])


def downgrade() -> None:
    op.drop_index("ix_answer_stats_minutes_minute", table_name="answer_stats_minutes")
    op.drop_table("answer_stats_minutes")
