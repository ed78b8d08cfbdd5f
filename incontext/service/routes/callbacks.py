"""Callback secrets (create, list, revoke) and each run's delivery history and redelivery."""

from __future__ import annotations

from fastapi import APIRouter

from incontext.service import callbacks, lifecycle, store
from incontext.service.deps import KeyDep, ReadSessionDep, ServiceDep, SessionDep
from incontext.service.errors import Conflict
from incontext.service.account_schemas import CallbackSecretCreate, CallbackSecretCreated, CallbackSecretPublic, DeliveryPublic

router = APIRouter(prefix="/v1", tags=["callbacks"])


@router.post("/callback-secrets", status_code=201, response_model=CallbackSecretCreated)
def create_callback_secret(body: CallbackSecretCreate, key: KeyDep, session: SessionDep):
    """A new signing secret, shown once. The two newest active secrets both sign, so
    rotate by creating a new one, updating the receiver, then revoking the old one."""
    row, plain = callbacks.create_secret(session, key.id, body.label)
    session.commit()
    return CallbackSecretCreated(**CallbackSecretPublic.from_row(row, row.id).model_dump(), plain_secret=plain)


@router.get("/callback-secrets", response_model=list[CallbackSecretPublic])
def list_callback_secrets(key: KeyDep, session: ReadSessionDep):
    """A bare array, as Runflow answers; `is_current` marks the secret Runflow-Signature uses."""
    rows = callbacks.list_secrets(session, key.id)
    current = next((r.id for r in reversed(rows) if r.revoked_at is None), None)
    return [CallbackSecretPublic.from_row(r, current) for r in rows]


@router.delete("/callback-secrets/{secret_id}", response_model=CallbackSecretPublic)
def revoke_callback_secret(secret_id: str, key: KeyDep, session: SessionDep):
    row = callbacks.revoke_secret(session, key.id, secret_id)
    session.commit()
    return CallbackSecretPublic.from_row(row)


@router.get("/runs/{run_id}/callback", response_model=list[DeliveryPublic])
def get_run_callback(run_id: str, key: KeyDep, service: ServiceDep, session: ReadSessionDep):
    """Every delivery of the run's callback, each with every attempt: a bare array, as Runflow answers."""
    store.get_run(session, key.id, run_id)
    max_attempts = service.settings.callback_max_attempts
    return [DeliveryPublic.from_row(d, a, max_attempts) for d, a in callbacks.deliveries_for_run(session, run_id)]


@router.post("/runs/{run_id}/callback-redeliveries", status_code=201, response_model=DeliveryPublic)
def redeliver_run_callback(run_id: str, key: KeyDep, service: ServiceDep, session: SessionDep):
    """Send the run's callback again, as a new delivery (with fresh output URLs)."""
    run = store.get_run(session, key.id, run_id)
    if not run.callback_url:
        raise Conflict("the run has no callback_url")
    if run.status not in lifecycle.TERMINAL:
        raise Conflict(f"the run has not ended (status {run.status}); its callback is sent when it does")
    delivery = callbacks.enqueue_run(session, run, service.storage)
    if delivery is None:
        raise Conflict("the run's webhook_events_filter asks for no callback at its end")
    session.commit()
    service.sender.wake()
    return DeliveryPublic.from_row(delivery, [], service.settings.callback_max_attempts)
