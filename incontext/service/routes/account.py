"""Health, the caller's key, and its usage."""

from __future__ import annotations

from fastapi import APIRouter

from incontext.service import store
from incontext.service.deps import KeyDep, ReadSessionDep
from incontext.service.account_schemas import KeyPublic, UsagePublic

router = APIRouter(prefix="/v1", tags=["account"])


@router.get("/health")
def health() -> dict:
    """Liveness; needs no key."""
    return {"ok": True}


@router.get("/auth/me", response_model=KeyPublic)
def auth_me(key: KeyDep):
    return KeyPublic.from_row(key)


@router.get("/usage", response_model=UsagePublic)
def get_usage(key: KeyDep, session: ReadSessionDep):
    """Runs, delivered images and cost of the calling key, per model. Failed and canceled
    runs are counted as runs but cost nothing."""
    return store.usage(session, key.id)
