"""The database: engine construction, sessions, and migrations run at start-up.

SQLite in the data dir by default, PostgreSQL by URL. Queries live in store.py and friends;
this module only knows how to connect and how to bring the schema up to date.
"""

from __future__ import annotations

import ast
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_REVISION_LINE = re.compile(r"^(revision|down_revision)\s*=\s*(.+)$", re.MULTILINE)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator):
    """Aware UTC datetimes in and out, on every backend.

    SQLite keeps no zone, so values are stored as naive UTC and given their zone back on read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Routes run in a thread pool and the dispatcher in another thread: share connections
        # across threads, and wait for a writer instead of failing with "database is locked".
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Let SQLAlchemy's "begin" event open transactions instead of the driver (see below).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # WAL lets readers proceed while the dispatcher writes; foreign keys are off by default.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


READ_ONLY = "incontext_read_only"  # an execution option: see make_session_factory


def _sqlite_begin(conn) -> None:
    # Take the write lock up front. A transaction that reads and then writes would otherwise
    # fail at once with SQLITE_BUSY when another writer got in between, instead of waiting.
    # Read-only sessions need no lock: in WAL mode they read the last commit at once.
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions for the service. `read_only` ones are for routes that only read (the GET a
    polling client sends over and over): on SQLite they do not queue behind the dispatcher's
    writes for the write lock. They must not write; SQLite would refuse at commit if they did."""
    # Rows are handed from a session to the code that built the response after commit.
    bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
    return sessionmaker(bind, expire_on_commit=False)


# Alembic's bookkeeping table, as Alembic creates it: a new database is stamped in it directly.
ALEMBIC_VERSION = sa.Table(
    "alembic_version",
    sa.MetaData(),
    sa.Column("version_num", sa.String(32), nullable=False),
    sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration shipped in the package.

    Alembic (in imports alone a good part of the server's start-up) runs only for a database
    that is behind. A new database gets the models' schema directly, stamped at the newest
    revision (tests/service/test_lifecycle.py holds that the migrations build the same
    schema); one already at the newest revision is recognised with one query."""
    heads = shipped_heads()
    with engine.begin() as conn:  # SQLite: under the write lock, so two processes cannot both create
        if _create_if_new(conn, heads) or applied_revisions(conn) == heads:
            return
    alembic_upgrade(engine)


def alembic_upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _create_if_new(conn: Connection, heads: set[str]) -> bool:
    if sa.inspect(conn).get_table_names():
        return False
    from incontext.service.models import Base  # here: models imports this module

    Base.metadata.create_all(conn)
    ALEMBIC_VERSION.create(conn)
    conn.execute(ALEMBIC_VERSION.insert(), [{"version_num": head} for head in sorted(heads)])
    return True


def applied_revisions(conn: Connection) -> set[str]:
    """The revisions Alembic recorded in the database; empty for a new database."""
    if not sa.inspect(conn).has_table(ALEMBIC_VERSION.name):
        return set()
    return set(conn.scalars(sa.select(ALEMBIC_VERSION.c.version_num)))


def shipped_heads() -> set[str]:
    """The newest revisions in migrations/versions (one, unless the history branches), from
    each file's `revision` and `down_revision` lines: importing the files would load Alembic."""
    revisions, parents = set(), set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        lines = dict(_REVISION_LINE.findall(path.read_text()))
        revisions.add(ast.literal_eval(lines["revision"]))
        down = ast.literal_eval(lines["down_revision"])
        parents.update(down if isinstance(down, tuple) else [down] if down else [])
    return revisions - parents
