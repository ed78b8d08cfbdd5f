"""The FastAPI app and the one place its parts are built.

    create_app(settings)                 # the real engine, built from settings at start-up
    create_app(settings, engine=other)   # any EngineClient: a remote engine, a test double

The lifespan opens the database (migrating it), loads the model once, recovers runs a
crash interrupted, and starts the dispatcher and the callback sender. With
INCONTEXT_DISPATCH=false it does neither of the first two: an API-only process in front of
workers on the same database (apionly.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from incontext import __version__
from incontext.engine.protocol import EngineClient, StepCallback
from incontext.models.registry import Registry, default_registry
from incontext.service import contentfilter, keys, logs, memory, metrics, openapi
from incontext.service.apionly import QueueOnly, WorkersEngine
from incontext.service.bodylimit import BodyLimitMiddleware
from incontext.service.callbacks import CallbackSender
from incontext.service.db import create_db_engine, make_session_factory, migrate
from incontext.service.deps import Service
from incontext.service.dispatcher import Dispatcher
from incontext.service.errors import install_error_handlers
from incontext.service.ids import uuid7
from incontext.service.metrics import Metrics
from incontext.service.netpolicy import NetPolicy
from incontext.service.outbound import Outbound
from incontext.service.ratelimit import RateLimiter
from incontext.service.retention import RetentionJob
from incontext.service.routes import account, batches, bfl, callbacks, discovery, events, fal, files, openai, playground, replicate, runs, workflows
from incontext.service.storage import Storage, load_or_create_secret
from incontext.settings import Settings

log = logging.getLogger(__name__)


class UnsafeStart(RuntimeError):
    """Refusing to serve as configured (e.g. open to the network with no API key)."""


def open_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    """Connect, migrate to the newest schema, and register INCONTEXT_API_KEYS."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.resolved_database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        keys.sync_env_keys(session, settings.api_keys)
    return engine, sessions


def check_safe_to_serve(settings: Settings, sessions: sessionmaker[Session], registry: Registry) -> None:
    """Refuse (UnsafeStart) a configuration that must not serve: a content filter that does not
    import; beyond loopback, no API key, or a non-commercial model nobody acknowledged."""
    if settings.content_filter:
        try:
            contentfilter.load(settings.content_filter)
        except ValueError as exc:
            raise UnsafeStart(f"{exc} (INCONTEXT_CONTENT_FILTER)") from None
    if settings.local_only:
        return
    check_licenses(settings, registry)
    with sessions() as session:
        if not keys.has_active_key(session):
            raise UnsafeStart(
                f"refusing to listen on {settings.host}: no API key exists, so anyone who can reach this "
                f"address could use the server. Create one first: incontext keys create --data-dir {settings.data_dir}"
            )


def check_licenses(settings: Settings, registry: Registry) -> None:
    """Beyond loopback, serving a model whose licence forbids commercial use takes the
    operator's acknowledgement; on loopback only its own user can reach it (a developer
    trying it out), so nothing is asked there. An unknown licence is logged, not refused:
    most fine-tunes declare none, and refusing them would only teach people to set the flag."""
    if settings.local_only:
        return
    for preset in registry.models.values():
        lic = preset.license
        if lic.commercial_use is False and not settings.accept_noncommercial_license:
            raise UnsafeStart(
                f"refusing to listen on {settings.host}: model {preset.id} ({preset.directory.name}) is under the "
                f"{lic.name}, which does not allow commercial use. Serve it on 127.0.0.1, or set "
                "INCONTEXT_ACCEPT_NONCOMMERCIAL_LICENSE=1 to acknowledge that this server's use of it is non-commercial"
            )
        if lic.commercial_use is None:
            log.warning("model %s (%s) declares no licence we know; check what its weights allow before serving them", preset.id, preset.directory.name)


def build_registry(settings: Settings) -> Registry:
    return default_registry(settings.model_dirs, default_dir=settings.model_dir)


def build_engine(settings: Settings, registry: Registry, on_step: StepCallback | None = None) -> EngineClient:
    """`on_step`: told every engine step's StepStats (the metrics')."""
    kwargs = {"max_batch_size": settings.engine_max_batch_size, "step_cache": settings.engine_step_cache,
              "compile_dir": settings.resolved_compile_dir if settings.engine_compile else None}
    if settings.engine_mode == "process":
        from incontext.engine.process import ProcessEngine

        return ProcessEngine(registry, http_nice=settings.http_nice, on_step=on_step, log_json=settings.log_format == "json", **kwargs)
    from incontext.engine.local import LocalEngine  # imports torch: only when actually serving

    return LocalEngine(registry, on_step=on_step, **kwargs)


class RequestIdMiddleware:
    """`request.state.request_id` and the `X-Request-Id` answer header: runs record the id of
    the request that created them; clients may send their own.

    Plain ASGI rather than `@app.middleware("http")`, which streams every request and
    response through an extra task and queue."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = Headers(scope=scope).get("x-request-id", "")[:64] or uuid7()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        token = logs.request_id.set(request_id)  # the request's log lines carry it (logs.py)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)


def create_app(settings: Settings | None = None, engine: EngineClient | None = None, *, on_queued: Callable[[], None] | None = None) -> FastAPI:
    """`on_queued`: for an API-only process (settings.dispatch false), called after runs were
    queued (apionly.QueueOnly)."""
    settings = settings or Settings()
    # Presets only, no weights: the OpenAPI document names the models' versions too.
    registry = build_registry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        db_engine, sessions = await asyncio.to_thread(open_database, settings)
        check_safe_to_serve(settings, sessions, registry)
        read_sessions = make_session_factory(db_engine, read_only=True)
        app.state.metrics = service_metrics = Metrics()
        service_metrics.watch_database(read_sessions, registry.models)
        model_engine = engine or (build_engine(settings, registry, on_step=service_metrics.observe_step) if settings.dispatch else WorkersEngine())
        await model_engine.start()
        if engine is None and settings.dispatch and settings.engine_mode == "process":  # not an engine in this process (memory.py)
            memory.return_freed_memory()
        storage = Storage(
            settings.data_dir,
            secret=load_or_create_secret(settings.data_dir, settings.secret_key.get_secret_value() if settings.secret_key else None),
            base_url=settings.base_url,
            ttl_seconds=settings.file_url_ttl_seconds,
        )
        sender = CallbackSender(
            sessions,
            max_attempts=settings.callback_max_attempts,
            backoff_s=settings.callback_backoff_seconds,
            backoff_max_s=settings.callback_backoff_max_seconds,
            timeout_s=settings.callback_timeout_seconds,
            claim_margin_s=settings.callback_claim_margin_seconds,
            poll_s=settings.poll_interval_seconds,
            policy=NetPolicy.from_settings(settings),
            on_attempt=service_metrics.callback_attempt,
        )
        outbound = Outbound(NetPolicy.from_settings(settings), max_concurrent=settings.fetch_max_concurrent)
        if settings.dispatch:
            dispatcher = Dispatcher(sessions=sessions, engine=model_engine, storage=storage, sender=sender, settings=settings, metrics=service_metrics)
        else:
            dispatcher = QueueOnly(on_queued)
        retention = RetentionJob(sessions, storage, days=settings.retention_days)
        await sender.start()
        await dispatcher.start()
        await retention.start()
        app.state.service = Service(
            settings=settings,
            registry=registry,
            engine=model_engine,
            sessions=sessions,
            read_sessions=read_sessions,
            storage=storage,
            dispatcher=dispatcher,
            sender=sender,
            outbound=outbound,
            limiter=RateLimiter(settings.rate_limit_per_minute),
            read_limiter=RateLimiter(settings.read_rate_limit_per_minute) if settings.read_rate_limit_per_minute else None,
            keys=keys.KeyCache(read_sessions, ttl_s=settings.api_key_cache_seconds, stamp=settings.data_dir / keys.STAMP_NAME),
        )
        log.info("serving %s on %s (data dir %s)", ", ".join(registry.ids()), settings.base_url, settings.data_dir)
        try:
            yield
        finally:
            await retention.close()
            await dispatcher.close()
            await sender.close()
            await outbound.aclose()
            if engine is None:  # a caller that passed an engine owns it
                await model_engine.close()
            db_engine.dispose()

    # docs_url/redoc_url: ours (routes/playground.py) serve their assets locally, not from a CDN.
    app = FastAPI(title="incontext", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    # replicate before discovery: its GET /v1/models/{owner}/{name}/versions would match discovery's {model_id:path};
    # workflows before runs and discovery, whose {model_id:path} routes would take the workflows' paths.
    for module in (account, workflows, runs, events, batches, callbacks, files, replicate, discovery, bfl, openai, fal, metrics):
        if module is fal:  # the workflows' fal apps first: fal's {app:path} routes take a model's input
            app.include_router(workflows.fal_router)
        app.include_router(module.router)
    playground.install(app)
    openapi.install(app, settings.base_url, registry)
    return app
