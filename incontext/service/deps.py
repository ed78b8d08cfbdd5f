"""What routes may depend on, as named aliases: the service's parts from app state, a
database session, the caller's API key, the rate limits, and the resolved model.

FastAPI runs a plain `def` dependency in its thread pool, one trip per dependency: those that
do no blocking I/O are `async def`, so they run on the event loop at no such cost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from incontext.engine.protocol import EngineClient
from incontext.models.registry import ModelPreset, Registry
from incontext.service.auth import authenticate
from incontext.service.callbacks import CallbackSender
from incontext.service.dispatcher import Dispatcher
from incontext.service.errors import RateLimited
from incontext.service.keys import KeyCache
from incontext.service.models import ApiKey
from incontext.service.outbound import Outbound
from incontext.service.ratelimit import RateLimiter
from incontext.service.storage import Storage
from incontext.settings import Settings


@dataclass
class Service:
    """Everything the lifespan builds once; lives on `app.state.service`."""

    settings: Settings
    registry: Registry
    engine: EngineClient
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]  # for routes that only read: db.make_session_factory
    storage: Storage
    dispatcher: Dispatcher
    sender: CallbackSender
    outbound: Outbound  # image_url fetches (inputs.prefetch)
    limiter: RateLimiter
    read_limiter: RateLimiter | None  # None: run reads are not limited
    keys: KeyCache


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_settings(service: ServiceDep) -> Settings:
    return service.settings


async def get_engine(service: ServiceDep) -> EngineClient:
    return service.engine


async def get_storage(service: ServiceDep) -> Storage:
    return service.storage


async def get_session(service: ServiceDep) -> AsyncIterator[Session]:
    # A session connects on first use, in the route's thread; closing it only ends what the
    # route left open (a rollback, at once), so neither end needs the thread pool.
    with service.sessions() as session:
        yield session


async def get_read_session(service: ServiceDep) -> AsyncIterator[Session]:
    with service.read_sessions() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[EngineClient, Depends(get_engine)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
KeyDep = Annotated[ApiKey, Depends(authenticate)]


async def resolve_model(model_id: str, service: ServiceDep) -> ModelPreset:
    # Registry.registered: ids and aliases only, never a directory path a URL could name.
    return service.registry.registered(model_id)


PresetDep = Annotated[ModelPreset, Depends(resolve_model)]


def count_images(service: Service, key: ApiKey, images: int) -> dict[str, str]:
    """Count the images a create asks for (a batch: all its items') against the key's
    per-minute limit; the headers to send with the answer."""
    decision = service.limiter.hit(key.id, images)
    if not decision.allowed:
        raise RateLimited(
            f"rate limit of {decision.limit} images per minute reached; retry in {decision.reset_s} s", headers=decision.headers()
        )
    return decision.headers()


def count_read(service: Service, key: ApiKey) -> dict[str, str]:
    """Count one run read against the key; the headers to send with the answer (none when
    reads are unlimited). Its own budget: polling never uses up the key's creations."""
    if service.read_limiter is None:
        return {}
    decision = service.read_limiter.hit(key.id)
    if not decision.allowed:
        raise RateLimited(
            f"rate limit of {decision.limit} run reads per minute reached; retry in {decision.reset_s} s "
            "(poll with backoff and If-None-Match, or use callback_url)",
            headers=decision.headers(),
        )
    return decision.headers()


async def read_limit(key: KeyDep, service: ServiceDep, response: Response) -> dict[str, str]:
    headers = count_read(service, key)
    response.headers.update(headers)  # for routes that return a model; the others pass them on
    return headers


ReadLimitDep = Annotated[dict[str, str], Depends(read_limit)]
