"""Alembic environment: always handed a live connection by adapters_registry.database.upgrade."""

from alembic import context

from adapters_registry.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
