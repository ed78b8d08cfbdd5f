"""What clients see of their account, beside their runs: API keys, usage, callback signing
secrets and each callback's deliveries. Field names are Runflow's."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from incontext.service.models import ApiKey, CallbackAttempt, CallbackDelivery, CallbackSecret
from incontext.service.schemas import Timestamp


class CallbackSecretCreate(BaseModel):
    label: str | None = Field(None, max_length=255)


class CallbackSecretPublic(BaseModel):
    """A signing secret, with Runflow's field names."""

    id: str
    label: str | None
    key_prefix: str = Field(description="the secret's first characters, to tell secrets apart")
    is_current: bool = Field(description="the newest active secret: the one Runflow-Signature is made with")
    created_at: Timestamp
    disabled_at: Timestamp | None = Field(description="when it was revoked; null while it signs")

    @classmethod
    def from_row(cls, row: CallbackSecret, current_id: str | None = None) -> CallbackSecretPublic:
        return cls(
            id=row.id, label=row.label, key_prefix=row.secret[:12], is_current=row.id == current_id and row.revoked_at is None,
            created_at=row.created_at, disabled_at=row.revoked_at,
        )


class CallbackSecretCreated(CallbackSecretPublic):
    plain_secret: str = Field(description="shown once; store it to verify callback signatures")


class AttemptPublic(BaseModel):
    attempt_number: int
    status_code: int | None
    response_time_ms: int
    error_message: str | None
    created_at: Timestamp


class DeliveryPublic(BaseModel):
    """One callback delivery, with Runflow's field names."""

    id: str
    run_id: str | None
    batch_id: str | None
    event: str
    callback_url: str
    status: str = Field(description="pending, delivered or failed")
    status_code: int | None = Field(description="the receiver's HTTP status at the last attempt; null if none answered")
    payload: dict[str, Any] = Field(description="the envelope, as sent (and signed) at every attempt")
    attempt_count: int
    max_attempts: int
    error_message: str | None = Field(description="why the last attempt failed; null after a delivery")
    next_attempt_at: Timestamp | None
    created_at: Timestamp
    completed_at: Timestamp | None
    attempts: list[AttemptPublic]

    @classmethod
    def from_row(cls, row: CallbackDelivery, attempts: list[CallbackAttempt], max_attempts: int) -> DeliveryPublic:
        last = attempts[-1] if attempts else None
        return cls(
            id=row.id,
            run_id=row.run_id,
            batch_id=row.batch_id,
            event=row.event,
            callback_url=row.url,
            status=row.status,
            status_code=last.status_code if last else None,
            payload=json.loads(row.body),
            attempt_count=row.attempt_count,
            max_attempts=max_attempts,
            error_message=last.error_message if last else None,
            next_attempt_at=row.next_attempt_at,
            created_at=row.created_at,
            completed_at=row.completed_at,
            attempts=[
                AttemptPublic(
                    attempt_number=a.attempt_number,
                    status_code=a.status_code,
                    response_time_ms=a.response_time_ms,
                    error_message=a.error_message,
                    created_at=a.created_at,
                )
                for a in attempts
            ],
        )


class KeyPublic(BaseModel):
    id: str
    label: str | None
    prefix: str
    created_at: Timestamp

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyPublic:
        return cls(id=row.id, label=row.label, prefix=row.prefix, created_at=row.created_at)


class ModelUsage(BaseModel):
    model_id: str
    runs: int
    succeeded: int
    images: int
    cost: str


class UsagePublic(BaseModel):
    api_key_id: str
    runs: int
    images: int
    cost: str
    models: list[ModelUsage]
