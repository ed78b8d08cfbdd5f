"""`incontext serve`, `incontext warmup` and `incontext keys …`; `register(app)` adds them to a Typer app.

    incontext keys create --data-dir ./data --label laptop    # prints the key, once
    INCONTEXT_MODEL_DIR=./my-model incontext serve --data-dir ./data --port 8000
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="default: $INCONTEXT_DATA_DIR or ~/.local/share/incontext")]
DatabaseUrl = Annotated[str | None, typer.Option("--database-url", help="default: SQLite in the data dir")]


def _settings(**overrides):
    from incontext.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        Console(stderr=True).print(f"[red]invalid settings:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


def serve(
    host: Annotated[str | None, typer.Option(help="default 127.0.0.1; another address needs an API key to exist")] = None,
    port: Annotated[int | None, typer.Option(help="default 8000")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    model_dir: Annotated[Path | None, typer.Option(help="serve this model directory as the default model")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    engine: Annotated[str, typer.Option(help="local: everything in this process; ray: a Ray Serve application of API replicas and engine workers on one PostgreSQL (docs/scale.md)")] = "local",
    replicas: Annotated[int, typer.Option(help="--engine ray: engine workers (with --max-replicas, the number to start with)")] = 1,
    max_replicas: Annotated[int | None, typer.Option(help="--engine ray: autoscale the workers on the queue, up to this many")] = None,
    min_replicas: Annotated[int, typer.Option(help="--engine ray, autoscaling: the fewest workers; 0 scales to zero while nothing is queued")] = 1,
    gpus_per_replica: Annotated[float, typer.Option(help="--engine ray: GPUs each worker takes (1: one engine per GPU; 0: CPU workers)")] = 0,
    ray_address: Annotated[str | None, typer.Option(help="--engine ray: join this Ray cluster (e.g. auto, ray://head:10001) instead of starting a local one")] = None,
) -> None:
    """Serve the HTTP API: database, engine and callbacks in this one process, or with
    --engine ray across a Ray cluster.

    On loopback with no API key at all, a key for the playground is made and the printed
    address carries it (DATA_DIR/playground.key)."""
    from incontext.service import keys, logs
    from incontext.service.app import UnsafeStart, build_registry, check_safe_to_serve, create_app, open_database

    settings = _settings(host=host, port=port, data_dir=data_dir, database_url=database_url, model_dir=model_dir)
    scaling = _ray_scaling(engine, settings, replicas=replicas, max_replicas=max_replicas, min_replicas=min_replicas, gpus_per_replica=gpus_per_replica)
    logs.configure(settings.log_format, log_level)
    # Checked before the server starts, so a refusal is quick and reads as a sentence.
    db_engine, sessions = open_database(settings)
    try:
        check_safe_to_serve(settings, sessions, build_registry(settings))
        key = None
        if settings.local_only:
            with sessions.begin() as session:
                key = keys.playground_key(session, settings.data_dir, may_create=not settings.api_keys)
    except UnsafeStart as exc:
        # Escaped: licence names hold brackets ("FLUX.1 [dev]"), which rich would take for markup.
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        db_engine.dispose()
    page = settings.base_url + "/" + (f"#key={key}" if key else "")
    if scaling is not None:
        from incontext.service import rayapp

        Console(stderr=True).print(f"The playground, once the workers are up: {page}", soft_wrap=True, markup=False, highlight=False)
        return rayapp.run(settings, scaling, ray_address=ray_address)
    if not _run_until_stopped(create_app(settings), settings, log_level, announce=f"The playground: {page}"):
        raise typer.Exit(3)  # uvicorn has logged why (e.g. the port is taken)


def _ray_scaling(engine: str, settings, **options):
    """--engine ray's Scaling, or None for the local server; refuses what cannot work."""
    if engine not in ("local", "ray"):
        _refuse(f"--engine must be local or ray, not {engine!r}")
    if engine == "local":
        return None
    if not settings.resolved_database_url.startswith("postgresql"):
        # Every worker and API replica is a process of its own: SQLite is for one.
        _refuse("--engine ray needs a PostgreSQL database shared by its processes: --database-url postgresql+psycopg://…")
    try:
        from incontext.service.rayapp import Scaling
    except ImportError:
        _refuse("--engine ray needs Ray Serve: pip install 'incontext[ray]'")
    try:
        return Scaling(**options)
    except ValidationError as exc:
        _refuse(str(exc))


def _refuse(message: str):
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _run_until_stopped(app, settings, log_level: str, *, announce: str) -> bool:
    """uvicorn.run, printing `announce` once the socket listens; False if it never started."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.started:
                return
            if settings.log_format == "json":  # a log pipeline reads stderr: every line a JSON object
                logging.getLogger(__name__).info(announce)
            else:  # soft_wrap: a link broken over two lines cannot be clicked or copied whole.
                Console(stderr=True).print(announce, soft_wrap=True, markup=False, highlight=False)

    # JSON: uvicorn's own lines (start-up, access log) go through our handler too, so every
    # line of the stream parses; text keeps uvicorn's coloured format.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level.lower(), log_config=log_config,
                                   timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return server.started


def warmup(
    data_dir: DataDir = None,
    model_dir: Annotated[Path | None, typer.Option(help="the model directory `serve --model-dir` will serve")] = None,
    model: Annotated[str | None, typer.Option(help="another registered model id or directory")] = None,
) -> None:
    """Compile the served model's transformer ahead of time (minutes), so `serve` loads it at once.

    Without it, the first `serve` on a machine builds it in the background at the lowest CPU
    priority and serves eagerly until it is ready. Kept per torch version, CPU and weights."""
    import time

    from incontext.engine.compiled import build, package_path
    from incontext.models.loader import load_model
    from incontext.service.app import build_registry

    settings = _settings(data_dir=data_dir, model_dir=model_dir)
    preset = build_registry(settings).resolve(model)
    console = Console(stderr=True)
    m = load_model(preset.directory, max_sequence_length=preset.max_sequence_length)
    path = package_path(settings.resolved_compile_dir, preset.directory, m)
    if path.exists():
        console.print(f"already compiled for this machine: {path}")
        return
    t0 = time.perf_counter()
    with console.status(f"compiling {preset.id}'s transformer (minutes on a CPU)"):
        build(m, path)
    console.print(f"compiled in {time.perf_counter() - t0:.0f} s: {path}")


def keys_create(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    label: Annotated[str | None, typer.Option(help="a note to tell keys apart")] = None,
) -> None:
    """Create an API key and print it alone on a line; it is stored hashed and shown only now."""
    from incontext.service import keys
    from incontext.service.app import open_database

    settings = _settings(data_dir=data_dir, database_url=database_url)
    db_engine, sessions = open_database(settings)
    with sessions.begin() as session:
        row, plain = keys.create_key(session, label)
    db_engine.dispose()
    typer.echo(plain)
    Console(stderr=True).print(f"created key {row.id} ({row.prefix}…); it cannot be shown again")


def keys_list(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """List API keys (never the keys themselves)."""
    from incontext.service import keys
    from incontext.service.app import open_database

    db_engine, sessions = open_database(_settings(data_dir=data_dir, database_url=database_url))
    with sessions() as session:
        rows = keys.list_keys(session)
    db_engine.dispose()
    table = Table("id", "prefix", "label", "created", "revoked")
    for r in rows:
        table.add_row(r.id, r.prefix, r.label or "", f"{r.created_at:%Y-%m-%d %H:%M}", f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "")
    Console().print(table)


def keys_revoke(
    key: Annotated[str, typer.Argument(help="the key's id or the prefix `keys list` shows")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from incontext.errors import IncontextError
    from incontext.service import keys
    from incontext.service.app import open_database

    settings = _settings(data_dir=data_dir, database_url=database_url)
    db_engine, sessions = open_database(settings)
    try:
        with sessions.begin() as session:
            row = keys.revoke_key(session, key)
        keys.mark_changed(settings.data_dir)  # servers on this data dir stop accepting it at once
    except IncontextError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None
    finally:
        db_engine.dispose()
    Console(stderr=True).print(f"revoked key {row.id} ({row.prefix}…)")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("warmup")(warmup)
    keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
    keys_app.command("create")(keys_create)
    keys_app.command("list")(keys_list)
    keys_app.command("revoke")(keys_revoke)
    app.add_typer(keys_app, name="keys")
