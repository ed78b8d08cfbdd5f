"""Retention: a finished run's files go `retention_days` after it ended; the run row stays."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from incontext.service import keys, lifecycle
from incontext.service.db import create_db_engine, make_session_factory, migrate, utcnow
from incontext.service.errors import NotFound
from incontext.service.models import Run
from incontext.service.retention import expire_files
from incontext.service.schemas import source_url
from incontext.service.storage import Storage


def test_files_of_runs_ended_before_the_cutoff_are_deleted(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    sessions = make_session_factory(engine)
    storage = Storage(tmp_path, secret=b"s", base_url="http://x", ttl_seconds=60)
    with sessions.begin() as session:
        key, _ = keys.create_key(session)
        runs = {}
        for name in ("old", "recent", "active"):
            run = lifecycle.create_run(session, api_key_id=key.id, model_id="m", engine_model_id="m", input={}, params={"unit_price_micros": 0})
            storage.save_input(run.id, b"input")
            storage.save_output(run.id, 0, b"png", "png")
            runs[name] = run.id
        for name in ("old", "recent"):
            lifecycle.mark_running(session, runs[name], from_states=(lifecycle.QUEUED,))
            lifecycle.finish(session, storage, runs[name], lifecycle.SUCCEEDED, output={"outputs": []})
        session.execute(sa.update(Run).where(Run.id == runs["old"]).values(completed_at=utcnow() - timedelta(days=8)))
    storage.save_output("not-a-run", 0, b"png", "png")  # a file whose run the database does not know
    # Until then an ended run's input is the "before" of its turn: the lineage's source_url.
    with sessions() as session:
        old_source = source_url(session.get(Run, runs["old"]), storage)
    old_input = old_source.removeprefix("http://x/v1/files/").split("?")[0]
    assert old_input == f"{runs['old']}/input" and storage.input_at(old_input) == b"input"

    assert expire_files(sessions, storage, utcnow() - timedelta(days=7)) == 2
    assert not (storage.outputs / runs["old"]).exists() and not storage.has_input(runs["old"])
    assert not (storage.outputs / "not-a-run").exists()
    assert (storage.outputs / runs["recent"] / "0.png").exists()
    assert (storage.outputs / runs["active"] / "0.png").exists() and storage.has_input(runs["active"])
    with pytest.raises(NotFound):  # its signed URL answers 404
        storage.input_at(old_input)
    with sessions() as session:
        assert source_url(session.get(Run, runs["old"]), storage) is None
        assert source_url(session.get(Run, runs["recent"]), storage).startswith(f"http://x/v1/files/{runs['recent']}/input?")
    with sessions() as session:
        assert session.get(Run, runs["old"]).status == "succeeded"  # the row stays
    assert expire_files(sessions, storage, utcnow() - timedelta(days=7)) == 0
    engine.dispose()
