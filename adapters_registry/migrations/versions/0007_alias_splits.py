"""Weighted alias splits: an alias may send its callers to several versions (and the base).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alias_splits",
        sa.Column("adapter_id", sa.Integer(), sa.ForeignKey("adapters.id"), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column("slot", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("adapter_versions.id"), nullable=True),
        sa.Column("weight", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("alias_splits")
