"""Admission takes keys in turn: one key's backlog does not stand before another key's run."""

from __future__ import annotations

from incontext.service import keys, lifecycle
from incontext.service.db import create_db_engine, make_session_factory, migrate


def test_a_single_run_of_one_key_is_claimed_before_another_keys_backlog(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        hog, other = keys.create_key(session)[0].id, keys.create_key(session)[0].id

        def queue(key_id):
            return lifecycle.create_run(session, api_key_id=key_id, model_id="m", engine_model_id="m", input={}, params={}).id

        backlog = [queue(hog) for _ in range(48)]
        mine = queue(other)  # the newest run of all
    with sessions.begin() as session:
        claimed, waiting = lifecycle.claim_queued(session, cap_per_model=2)
    assert [r.id for r in claimed] == [backlog[0], mine] and waiting
    engine.dispose()
