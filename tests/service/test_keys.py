"""API keys: the cache (requests authenticate without the database, and revocation still
holds) and the key a loopback `serve` makes for the playground."""

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


def playground_key(sessions, data_dir, *, may_create: bool = True) -> str | None:
    with sessions.begin() as session:  # as `serve` does at every start
        return keys.playground_key(session, data_dir, may_create=may_create)


def test_the_playground_key_is_made_once_and_read_back_at_every_start(sessions, tmp_path):
    made = playground_key(sessions, tmp_path)
    path = tmp_path / keys.PLAYGROUND_KEY_NAME
    assert made.startswith(keys.KEY_PREFIX) and path.read_text().strip() == made
    assert path.stat().st_mode & 0o777 == 0o600  # the owner's alone
    assert playground_key(sessions, tmp_path) == made  # a restart: the same key, no new one
    with sessions() as session:
        rows = keys.list_keys(session)
        assert [(r.label, r.revoked_at) for r in rows] == [("local playground", None)]
        assert keys.find_active(session, made).id == rows[0].id

    revoke(sessions, rows[0].id)  # revoked: no link, and no new key behind the user's back
    assert playground_key(sessions, tmp_path) is None
    with sessions() as session:
        assert len(keys.list_keys(session)) == 1


def test_no_playground_key_is_made_where_a_key_exists_or_creating_is_not_allowed(sessions, tmp_path):
    assert playground_key(sessions, tmp_path, may_create=False) is None  # INCONTEXT_API_KEYS set
    new_key(sessions)
    assert playground_key(sessions, tmp_path) is None  # the user has a key: they paste it
    assert not (tmp_path / keys.PLAYGROUND_KEY_NAME).exists()
