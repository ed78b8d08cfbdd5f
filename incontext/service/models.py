"""Database tables. Internal columns (hashes, resolved parameters, file paths) live here and
never reach a response directly: schemas.py decides what clients see."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from incontext.service.db import UTCDateTime, utcnow
from incontext.service.ids import uuid7

ID = sa.String(36)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON(), list[Any]: sa.JSON()}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=uuid7)
    label: Mapped[str | None] = mapped_column(sa.String(255))
    prefix: Mapped[str] = mapped_column(sa.String(32))  # shown in listings to tell keys apart
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)  # sha256 hex of the key
    source: Mapped[str] = mapped_column(sa.String(16), default="cli")  # cli | env
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=uuid7)
    api_key_id: Mapped[str] = mapped_column(ID, sa.ForeignKey("api_keys.id"), index=True)
    model_id: Mapped[str] = mapped_column(sa.String(255))
    # Null while items run (the status is then derived from them); set once, at the end.
    status: Mapped[str | None] = mapped_column(sa.String(32))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    callback_url: Mapped[str | None] = mapped_column(sa.String(2048))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (sa.Index("ix_runs_key_status", "api_key_id", "status"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=uuid7)
    api_key_id: Mapped[str] = mapped_column(ID, sa.ForeignKey("api_keys.id"), index=True)
    model_id: Mapped[str] = mapped_column(sa.String(255))  # as the client named it
    engine_model_id: Mapped[str] = mapped_column(sa.String(255), index=True)  # the preset's id
    status: Mapped[str] = mapped_column(sa.String(32), index=True)
    input: Mapped[dict[str, Any]]  # as sent, with inline image data abbreviated
    params: Mapped[dict[str, Any]]  # validated inputs with defaults and the chosen seed
    output: Mapped[dict[str, Any] | None]
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    callback_url: Mapped[str | None] = mapped_column(sa.String(2048))
    client_ref: Mapped[str | None] = mapped_column(sa.String(255))
    batch_id: Mapped[str | None] = mapped_column(ID, sa.ForeignKey("batches.id"), index=True)
    parent_run_id: Mapped[str | None] = mapped_column(ID)
    request_id: Mapped[str | None] = mapped_column(sa.String(64))
    num_images: Mapped[int] = mapped_column(default=1)
    cost_micros: Mapped[int] = mapped_column(sa.BigInteger, default=0)  # millionths of a dollar
    failure_code: Mapped[str | None] = mapped_column(sa.String(64))
    failure_message: Mapped[str | None] = mapped_column(sa.Text)
    failure_stage_code: Mapped[str | None] = mapped_column(sa.String(32))
    # Times the engine's process died while it had the run: each queues it again, until
    # INCONTEXT_ENGINE_MAX_ATTEMPTS, when it fails with ENGINE_CRASHED (lifecycle.requeue_lost).
    # Joined by lease expiries (leases.reap): a worker that dies takes its engine with it, and
    # in the thread engine mode an input that kills the engine kills the worker. One count,
    # one bound, whichever process the run took down.
    engine_crashes: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    # Who holds the run while it is dispatching or running (leases.py): the worker (a server
    # process), until when unless it renews, and the fence of its claim, which grows at every
    # claim so a worker that lost the run can write nothing more to it.
    worker_id: Mapped[str | None] = mapped_column(sa.String(64))
    lease_expires_at: Mapped[datetime | None]
    fence: Mapped[int] = mapped_column(default=0, server_default=sa.text("0"))


class RunLog(Base):
    __tablename__ = "run_logs"

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=uuid7)
    run_id: Mapped[str] = mapped_column(ID, sa.ForeignKey("runs.id"), index=True)
    level_code: Mapped[str] = mapped_column(sa.String(16))
    message: Mapped[str] = mapped_column(sa.Text)
    timestamp: Mapped[datetime] = mapped_column(default=utcnow)
    meta: Mapped[dict[str, Any] | None]


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_keys"

    api_key_id: Mapped[str] = mapped_column(ID, sa.ForeignKey("api_keys.id"), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(sa.String(64))  # sha256 of route + canonical body
    status_code: Mapped[int]
    response: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CallbackSecret(Base):
    __tablename__ = "callback_secrets"

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=uuid7)
    api_key_id: Mapped[str] = mapped_column(ID, sa.ForeignKey("api_keys.id"), index=True)
    label: Mapped[str | None] = mapped_column(sa.String(255))
    # Kept in plain text: signing needs it (it is a shared secret, not a password).
    secret: Mapped[str] = mapped_column(sa.String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class CallbackDelivery(Base):
    """One envelope to one URL; its id is the Standard Webhooks `webhook-id`, fixed across retries."""

    __tablename__ = "callback_deliveries"

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=uuid7)
    api_key_id: Mapped[str] = mapped_column(ID, sa.ForeignKey("api_keys.id"))
    run_id: Mapped[str | None] = mapped_column(ID, sa.ForeignKey("runs.id"), index=True)
    batch_id: Mapped[str | None] = mapped_column(ID, sa.ForeignKey("batches.id"), index=True)
    url: Mapped[str] = mapped_column(sa.String(2048))
    event: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[str] = mapped_column(sa.Text)  # the exact bytes signed and sent, every attempt
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")  # pending | delivered | failed
    attempt_count: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]


class CallbackAttempt(Base):
    __tablename__ = "callback_attempts"

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=uuid7)
    delivery_id: Mapped[str] = mapped_column(ID, sa.ForeignKey("callback_deliveries.id"), index=True)
    attempt_number: Mapped[int]
    status_code: Mapped[int | None]
    response_time_ms: Mapped[int]
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
