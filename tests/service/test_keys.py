"""The API-key cache: requests authenticate without the database, and revocation still holds."""

from __future__ import annotations

import pytest

from incontext.service import keys
from incontext.service.db import create_db_engine, make_session_factory, migrate


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sessions(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    yield make_session_factory(engine)
    engine.dispose()


def new_key(sessions) -> tuple[str, str]:
    with sessions.begin() as session:
        row, plain = keys.create_key(session, "test")
        return row.id, plain


def revoke(sessions, key_id: str) -> None:
    with sessions.begin() as session:
        keys.revoke_key(session, key_id)


def test_a_key_is_remembered_until_its_time_runs_out(sessions, tmp_path):
    clock = Clock()
    cache = keys.KeyCache(sessions, ttl_s=5, stamp=tmp_path / keys.STAMP_NAME, clock=clock)
    key_id, plain = new_key(sessions)
    assert cache.cached(plain) is None  # not asked for yet
    assert cache.find(plain).id == key_id
    assert cache.cached(plain).id == key_id

    # Revoked from elsewhere (no stamp on this data dir): refused once the entry expires.
    revoke(sessions, key_id)
    clock.now += 4.9
    assert cache.cached(plain).id == key_id
    clock.now += 0.2
    assert cache.cached(plain) is None
    assert cache.find(plain) is None


def test_revoking_on_the_same_data_dir_takes_effect_at_once(sessions, tmp_path):
    cache = keys.KeyCache(sessions, ttl_s=3600, stamp=tmp_path / keys.STAMP_NAME, clock=Clock())
    key_id, plain = new_key(sessions)
    other_id, other = new_key(sessions)
    assert cache.find(plain).id == key_id and cache.find(other).id == other_id

    revoke(sessions, key_id)
    keys.mark_changed(tmp_path)
    assert cache.cached(plain) is None and cache.find(plain) is None
    assert cache.cached(other) is None and cache.find(other).id == other_id  # still valid, asked again


def test_ttl_zero_turns_the_cache_off(sessions, tmp_path):
    cache = keys.KeyCache(sessions, ttl_s=0, stamp=tmp_path / keys.STAMP_NAME, clock=Clock())
    assert cache.find("ic_live_not-a-key") is None
    key_id, plain = new_key(sessions)
    assert cache.find(plain).id == key_id
    assert cache.cached(plain) is None
