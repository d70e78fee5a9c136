"""Alembic's environment: migrate over the connection :func:`inspector.review.store.migrate` hands in."""

from alembic import context

from inspector.review.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
