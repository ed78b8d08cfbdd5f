"""API keys: made here, stored only as a hash, looked up on every request (through KeyCache).

A key is `ic_live_` + 32 random bytes in url-safe base64. It has that much entropy, so a
plain SHA-256 is enough to store it (a slow password hash would only slow every request).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from incontext.errors import IncontextError
from incontext.service.db import utcnow
from incontext.service.models import ApiKey, Run

KEY_PREFIX = "ic_live_"


class KeyNotFound(IncontextError):
    code = "NOT_FOUND"
    http_status = 404


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, label: str | None = None) -> tuple[ApiKey, str]:
    """A new key: (its row, the key itself, which is shown once and never stored)."""
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(label=label, prefix=plain[: len(KEY_PREFIX) + 6], key_hash=hash_key(plain), source="cli")
    session.add(row)
    session.flush()
    return row, plain


def sync_env_keys(session: Session, keys: list[str]) -> None:
    """Make keys from INCONTEXT_API_KEYS usable: each gets a row (so runs and usage can point at it)."""
    for plain in keys:
        digest = hash_key(plain)
        if session.scalar(sa.select(ApiKey).where(ApiKey.key_hash == digest)) is None:
            session.add(ApiKey(label="INCONTEXT_API_KEYS", prefix=plain[:6] + "…", key_hash=digest, source="env"))
    session.flush()


def find_active(session: Session, plain: str) -> ApiKey | None:
    return session.scalar(sa.select(ApiKey).where(ApiKey.key_hash == hash_key(plain), ApiKey.revoked_at.is_(None)))


STAMP_NAME = "keys.changed"
_MAX_CACHED = 10_000


def mark_changed(data_dir: Path) -> None:
    """Tell servers on this data dir that a key was revoked: their caches empty at once."""
    (data_dir / STAMP_NAME).touch()  # a new mtime is the signal (KeyCache compares it)


class KeyCache:
    """Active keys by hash, remembered for `ttl_s` seconds, so a request authenticates without
    a database session (that was half of a GET's server time: docs/engine.md).

    A revocation made with `incontext keys revoke` on this data dir touches `stamp`, which
    empties the cache at the next request; one made elsewhere (another machine on the same
    PostgreSQL) takes effect within `ttl_s`. Unknown keys are never remembered, so a key
    created a moment ago works at once. `ttl_s` 0 turns the cache off."""

    def __init__(self, sessions: sessionmaker[Session], *, ttl_s: float, stamp: Path, clock: Callable[[], float] = time.monotonic):
        self._sessions, self._ttl, self._stamp, self._clock = sessions, ttl_s, stamp, clock
        self._keys: dict[str, tuple[float, ApiKey]] = {}  # hash → (expires at, detached row)
        self._stamp_seen = self._stamp_mtime()

    def cached(self, plain: str) -> ApiKey | None:
        """The key if it is remembered and fresh; None means: ask `find` (which blocks)."""
        stamp = self._stamp_mtime()
        if stamp != self._stamp_seen:
            self._keys.clear()
            self._stamp_seen = stamp
        hit = self._keys.get(hash_key(plain))
        return hit[1] if hit is not None and self._clock() < hit[0] else None

    def find(self, plain: str) -> ApiKey | None:
        """Look the key up in the database and remember it if it is active."""
        with self._sessions() as session:
            key = find_active(session, plain)
        if key is not None and self._ttl > 0:
            if len(self._keys) >= _MAX_CACHED:
                self._keys.clear()
            self._keys[key.key_hash] = (self._clock() + self._ttl, key)
        return key

    def _stamp_mtime(self) -> int:
        try:
            return self._stamp.stat().st_mtime_ns
        except FileNotFoundError:
            return 0


PLAYGROUND_KEY_NAME = "playground.key"
PLAYGROUND_LABEL = "local playground"


def playground_key(session: Session, data_dir: Path, *, may_create: bool) -> str | None:
    """The key a loopback `serve` puts in the playground link it prints (as Jupyter prints its
    token), so a new user's first page needs no key setup.

    With `may_create` and no key at all (revoked ones count: a user who revoked keys chose to
    manage them), a key labelled "local playground" is created and its plain text kept in
    `<data_dir>/playground.key`, readable by its owner only; later starts read it back. None
    when there is no such file or its key was revoked: the user pastes a key of their own.
    The caller commits."""
    path = data_dir / PLAYGROUND_KEY_NAME
    if may_create and session.scalar(sa.select(sa.func.count()).select_from(ApiKey)) == 0:
        _, plain = create_key(session, PLAYGROUND_LABEL)
        # Written before the commit: if the commit fails, no key exists and the next start
        # makes a new one over this file; the other order could leave a key no file holds.
        _write_private(path, plain)
        return plain
    try:
        plain = path.read_text().strip()
    except FileNotFoundError:
        return None
    return plain if plain and find_active(session, plain) is not None else None


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # a tmp file left by a crash may have other bits
        f.write(text + "\n")
    os.replace(tmp, path)


def has_active_key(session: Session) -> bool:
    return session.scalar(sa.select(sa.func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))) > 0


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(sa.select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, id_or_prefix: str) -> ApiKey:
    """Revoke by id, or by the prefix `keys list` shows (if it names one key)."""
    rows = list(
        session.scalars(
            sa.select(ApiKey).where(sa.or_(ApiKey.id == id_or_prefix, ApiKey.prefix == id_or_prefix))
        )
    )
    if len(rows) != 1:
        raise KeyNotFound(f"no single key has id or prefix '{id_or_prefix}'")
    if rows[0].revoked_at is None:
        rows[0].revoked_at = utcnow()
    return rows[0]


def run_key_revoked(session: Session, run_id: str) -> bool:
    """Whether the key that made run `run_id` is revoked: its signed file URLs stop working
    with it (a leaked key's outputs should not stay public until their URLs expire). False
    for a run the database does not know; its files answer 404."""
    revoked_at = session.scalar(sa.select(ApiKey.revoked_at).join(Run, Run.api_key_id == ApiKey.id).where(Run.id == run_id))
    return revoked_at is not None
