"""Alembic environment for the detector's schema.

Migrates the connection handed over in `config.attributes["connection"]` (see
`detector.storage.database.upgrade`), or else the database named by `MIA_DATABASE_URL`, which is how
developers run the `alembic` command.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from detector.storage.database import create_engine_for, normalize_url
from detector.storage.tables import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

# Only the `alembic` command line has an ini file; a running detector keeps its own logging setup.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _render_item(kind: str, obj: Any, _autogen_context: AutogenContext) -> str | Literal[False]:
    # Revisions must not import the application: they describe the schema as it was when written.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=_render_item,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _database_url() -> str:
    url = os.environ.get("MIA_DATABASE_URL")
    if not url:
        raise RuntimeError("set MIA_DATABASE_URL to the database to migrate")
    return url


def run_migrations_offline() -> None:
    """Emit the migration SQL for `MIA_DATABASE_URL`'s dialect instead of running it."""
    url = normalize_url(_database_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate the given connection, or a connection to `MIA_DATABASE_URL`."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine_for(_database_url())
    try:
        with engine.begin() as owned:
            _run(owned)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
