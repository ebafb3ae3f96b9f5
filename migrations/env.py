"""Alembic environment: the database is the service's (settings), unless the caller set sqlalchemy.url."""

from __future__ import annotations

from alembic import context

from domain.db import get_engine, normalize_url
from domain.models import Base
from domain.settings import get_settings

config = context.config
url = normalize_url(config.get_main_option("sqlalchemy.url") or get_settings().database)


def run_migrations() -> None:
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    with get_engine(url).connect() as connection:
        # SQLite alters tables by copying them; batch mode does that for us
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()


run_migrations()
