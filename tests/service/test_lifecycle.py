"""Migrations and run state transitions on a real (SQLite) database, without the engine."""

import re
import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from incontext.service import leases, lifecycle, store
from incontext.service.db import (
    MIGRATIONS_DIR,
    alembic_upgrade,
    applied_revisions,
    create_db_engine,
    make_session_factory,
    migrate,
    shipped_heads,
)
from incontext.service.errors import Conflict
from incontext.service.keys import create_key
from incontext.service.models import Base, Run
from incontext.service.storage import Storage


@pytest.fixture
def db(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    yield engine, make_session_factory(engine), Storage(tmp_path, secret=b"s", base_url="http://x", ttl_seconds=60)
    engine.dispose()


def new_run(session, key_id, model="m", **extra):
    params = {"unit_price_micros": 40_000}
    return lifecycle.create_run(session, api_key_id=key_id, model_id=model, engine_model_id=model, input={}, params=params, **extra).id


def test_migrations_match_the_models(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'migrated.sqlite'}")
    alembic_upgrade(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_a_new_database_is_what_the_migrations_build(tmp_path):
    # migrate() creates a new database from the models and stamps it without Alembic.
    created = create_db_engine(f"sqlite:///{tmp_path / 'created.sqlite'}")
    migrated = create_db_engine(f"sqlite:///{tmp_path / 'migrated.sqlite'}")
    migrate(created)
    alembic_upgrade(migrated)
    assert sqlite_schema(created) == sqlite_schema(migrated)
    heads = set(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())
    with created.connect() as conn:
        assert set(MigrationContext.configure(conn).get_current_heads()) == heads
        assert applied_revisions(conn) == shipped_heads() == heads
    alembic_upgrade(created)  # Alembic finds nothing to do
    migrate(created)  # nor does migrate(), at the head
    assert sqlite_schema(created) == sqlite_schema(migrated)
    created.dispose()
    migrated.dispose()


def sqlite_schema(engine) -> dict[str, list[str]]:
    """Every table's and index's DDL, line by line in any order (foreign keys may be listed in
    another order; a column a migration added comes last, on the line of the one before it),
    and the rows of alembic_version."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")).all()
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()

    def parts(sql: str) -> list[str]:
        lines = [part for line in sql.splitlines() for part in re.split(r",\s+(?=\w+ [A-Z])", line)]
        return sorted(line.strip().rstrip(",") for line in lines)

    return {name: parts(sql) for name, sql in rows} | {"versions": sorted(versions)}


def test_claim_respects_the_per_model_cap_and_order(db):
    _, sessions, _ = db
    with sessions.begin() as s:
        key, _ = create_key(s)
        a = [new_run(s, key.id, "a") for _ in range(3)]
        b = [new_run(s, key.id, "b") for _ in range(2)]
    with sessions.begin() as s:
        runs, waiting = leases.claim(s, "worker", lease_s=30, cap_per_model=2)
        assert [r.id for r in runs] == [a[0], a[1], b[0], b[1]] and waiting
    with sessions.begin() as s:
        assert leases.claim(s, "worker", lease_s=30, cap_per_model=2) == ([], True)  # both models at the cap
        lifecycle.finish(s, db[2], a[0], lifecycle.FAILED, failure=("X", "x", "inference"))
    with sessions.begin() as s:
        runs, waiting = leases.claim(s, "worker", lease_s=30, cap_per_model=2)
        assert [r.id for r in runs] == [a[2]] and not waiting
        assert leases.claim(s, "worker", lease_s=30, cap_per_model=2) == ([], False)


def test_a_run_whose_input_is_ready_starts_when_claimed(db):
    _, sessions, _ = db
    with sessions.begin() as s:
        key, _ = create_key(s)
        ready, stored = new_run(s, key.id), new_run(s, key.id)
    with sessions.begin() as s:
        runs, _ = leases.claim(s, "worker", lease_s=30, cap_per_model=5, ready={ready})
        assert [(r.id, r.status) for r in runs] == [(ready, "running"), (stored, "dispatching")]
        assert runs[0].started_at is not None and runs[1].started_at is None
    with sessions() as s:
        assert [log.message for log in store.run_logs(s, ready)] == ["accepted", "started"]


def test_first_terminal_status_wins_and_recovery(db):
    _, sessions, storage = db
    with sessions.begin() as s:
        key, _ = create_key(s)
        done, running, lost = (new_run(s, key.id) for _ in range(3))
        leases.claim(s, "worker", lease_s=30, cap_per_model=5)
        for run_id in (done, running, lost):
            lifecycle.mark_running(s, run_id)
        run = lifecycle.cancel(s, storage, s.get(Run, done))
        assert run.status == "canceled" and run.cost_micros == 0
        assert lifecycle.finish(s, storage, done, lifecycle.SUCCEEDED, output={"outputs": [{}]}) is None
        with pytest.raises(Conflict):
            lifecycle.cancel(s, storage, run)
    storage.save_input(running, b"img")
    with sessions.begin() as s:
        assert lifecycle.recover_interrupted(s, storage) == (1, 1)
    with sessions() as s:
        assert s.get(Run, running).status == "queued"
        lost_run = s.get(Run, lost)
        assert (lost_run.status, lost_run.failure_code) == ("failed", "INPUT_LOST")


def test_batch_status():
    counts = dict.fromkeys(("queued", "dispatching", "running", "succeeded", "failed", "canceled"), 0)
    assert lifecycle.batch_status({**counts, "queued": 2, "total": 2}) == "queued"
    assert lifecycle.batch_status({**counts, "queued": 1, "succeeded": 1, "total": 2}) == "running"
    assert lifecycle.batch_status({**counts, "succeeded": 2, "total": 2}) == "succeeded"
    assert lifecycle.batch_status({**counts, "succeeded": 1, "canceled": 1, "total": 2}) == "partial_succeeded"
    assert lifecycle.batch_status({**counts, "failed": 2, "total": 2}) == "failed"


def test_reads_are_not_held_up_by_a_writer(db):
    # A client polling GET /v1/runs/{id} must not wait for the dispatcher's write lock.
    engine, sessions, _ = db
    with sessions.begin() as session:
        key, _ = create_key(session)
        run_id = new_run(session, key.id)
    writer = sessions()
    lifecycle.add_log(writer, run_id, "holding the write lock")  # BEGIN IMMEDIATE: the lock is taken
    try:
        done = threading.Event()

        def read():
            with make_session_factory(engine, read_only=True)() as session:
                assert store.get_run(session, key.id, run_id).status == lifecycle.QUEUED
            done.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert done.wait(5), "a read-only session waited for the writer"
        reader.join()
    finally:
        writer.rollback()
        writer.close()
