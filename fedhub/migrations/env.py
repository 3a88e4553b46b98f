"""Alembic environment: runs on the connection `fedhub.db` hands over (an async engine's, via run_sync)."""

from __future__ import annotations

from alembic import context

from fedhub.db import target_metadata

connection = context.config.attributes.get("connection")
if connection is None:
    # Offline SQL generation and the bare `alembic` command would need an ini with a URL; fedhub
    # opens its own async engine instead, so there is exactly one way in.
    raise RuntimeError("run fedhub migrations through fedhub.db.upgrade (`fedhub db upgrade`)")

context.configure(
    connection=connection,
    target_metadata=target_metadata(),
    compare_type=True,
    # SQLite alters tables by copying them; Alembic's batch mode does that for us.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
