"""API keys: made here, stored only as a hash, looked up on every request.

A key is `ic_live_` + 32 random bytes in url-safe base64. It has that much entropy, so a
plain SHA-256 is enough to store it (a slow password hash would only slow every request).
"""

from __future__ import annotations

import hashlib
import secrets

import sqlalchemy as sa
from sqlalchemy.orm import Session

from incontext.errors import IncontextError
from incontext.service.db import utcnow
from incontext.service.models import ApiKey

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
