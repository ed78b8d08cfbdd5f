"""Alembic environment: called by db.migrate() with an open connection, or by the alembic CLI
(`alembic -x url=sqlite:///… revision --autogenerate -m …` from this directory's parent)."""

from alembic import context
from sqlalchemy import create_engine

from incontext.service.models import Base

config = context.config
target_metadata = Base.metadata


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True)["url"]
    with create_engine(url).connect() as conn:
        run(conn)
        conn.commit()
