"""Admission takes keys in turn: one key's backlog does not stand before another key's run."""

from __future__ import annotations

from incontext.service import keys, leases, lifecycle
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
        claimed, waiting = leases.claim(session, "worker", lease_s=30, cap_per_model=2)
    assert [r.id for r in claimed] == [backlog[0], mine] and waiting
    engine.dispose()


def test_a_key_with_runs_in_flight_waits_behind_a_key_with_none_as_slots_free_one_at_a_time(tmp_path):
    """The hog's 16 runs fill the cap; as each ends, the freed slot goes to the other key's
    single run first, not to the hog's older queued runs (which have the same turn)."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        hog, other = keys.create_key(session)[0].id, keys.create_key(session)[0].id
        backlog = [lifecycle.create_run(session, api_key_id=hog, model_id="m", engine_model_id="m", input={}, params={}).id for _ in range(48)]
    with sessions.begin() as session:
        first, _ = leases.claim(session, "worker", lease_s=30, cap_per_model=16)
    assert [r.id for r in first] == backlog[:16]
    with sessions.begin() as session:
        mine = lifecycle.create_run(session, api_key_id=other, model_id="m", engine_model_id="m", input={}, params={}).id
        lifecycle.mark_running(session, first[0].id)
        lifecycle.finish(session, None, first[0].id, lifecycle.FAILED, failure=("X", "x", "x"))  # one slot frees
    with sessions.begin() as session:
        claimed, waiting = leases.claim(session, "worker", lease_s=30, cap_per_model=16)
    assert [r.id for r in claimed] == [mine] and waiting
    engine.dispose()


def test_a_key_never_has_more_than_its_cap_in_flight(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        hog, other = keys.create_key(session)[0].id, keys.create_key(session)[0].id
        backlog = [lifecycle.create_run(session, api_key_id=hog, model_id="m", engine_model_id="m", input={}, params={}).id for _ in range(10)]
        mine = lifecycle.create_run(session, api_key_id=other, model_id="m", engine_model_id="m", input={}, params={}).id
    with sessions.begin() as session:
        claimed, waiting = leases.claim(session, "worker", lease_s=30, cap_per_model=16, cap_per_key=3)
    assert [r.id for r in claimed] == [backlog[0], mine, backlog[1], backlog[2]] and waiting
    with sessions.begin() as session:
        assert leases.claim(session, "worker", lease_s=30, cap_per_model=16, cap_per_key=3) == ([], True)
    engine.dispose()
