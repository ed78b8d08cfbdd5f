"""The one settings object: every knob of the server, read from `INCONTEXT_*` variables.

    INCONTEXT_DATA_DIR=/srv/incontext INCONTEXT_MODEL_DIR=./my-model incontext serve --port 8000

Command-line options of `incontext serve` override the environment. Settings are read in
this module only; everything else receives a `Settings` instance.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "incontext"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INCONTEXT_", extra="ignore")

    # Where the database (by default), run inputs and outputs live.
    data_dir: Path = Field(default_factory=default_data_dir)
    # SQLAlchemy URL; empty means SQLite in the data dir. PostgreSQL: postgresql+psycopg://…
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # The address clients reach this server at; output and link URLs are built from it.
    # Behind a proxy or on a non-loopback host, set it (default: http://host:port).
    public_url: str | None = None
    # Serve this model directory as the default model (and its hosted aliases).
    model_dir: Path | None = None
    # More models, as comma-separated id=directory pairs. A published id (flux-2-klein-4b,
    # flux-2-klein-9b, flux-2-klein-9b-kv, flux-2-klein-base-4b, flux-2-klein-base-9b,
    # qwen-image-edit, qwen-image-edit-plus) gets its published defaults, ranges, licence
    # and hosted aliases (`incontext models` lists them; models/registry.py PUBLISHED); any
    # other id is served with the directory's own incontext.json. Nothing is downloaded.
    model_dirs: Annotated[dict[str, Path], NoDecode] = Field(default_factory=dict)
    # A model whose licence allows no commercial use (FLUX.1 Kontext [dev]; `incontext models`
    # shows each licence) is served beyond loopback only with this set: the operator's word
    # that this server's use is non-commercial. Loopback needs none.
    accept_noncommercial_license: bool = False
    # "module:function", importable by the server (or it refuses to start): called with each
    # run's prompt and input image before the run is accepted, and with its output images
    # before they are stored; it refuses with CONTENT_REFUSED, and if it raises, the content is
    # refused with CONTENT_FILTER_FAILED (service/contentfilter.py). Unset: no filter.
    content_filter: str | None = None

    # Comma-separated API keys accepted besides those created with `incontext keys create`.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # How long a server remembers an active key instead of asking the database on every request.
    # `incontext keys revoke` on the same data dir takes effect at once regardless; a key revoked
    # from another machine (a shared PostgreSQL) is refused within this time. 0: no cache.
    api_key_cache_seconds: float = Field(5.0, ge=0)
    # Who may read GET /metrics (service/metrics.py): with this set, a scraper that sends it as
    # `Authorization: Bearer <token>`; unset, anyone who reaches a server listening on loopback,
    # and nobody beyond loopback. Not an API key: a key is a customer's, and the metrics describe
    # every customer's traffic. Behind a reverse proxy on the same machine, set it (or do not
    # forward /metrics): the proxy makes a loopback server reachable.
    metrics_token: SecretStr | None = None
    # Server log lines: "text" for people, "json" for a log pipeline: one object a line, with
    # the run_id (and request_id) of the run (request) it is about (service/logs.py).
    log_format: Literal["text", "json"] = "text"
    # Signs output URLs; generated once into the data dir when unset.
    secret_key: SecretStr | None = None
    file_url_ttl_seconds: int = Field(3600, ge=1)

    # Runs of one model in flight at once; the rest wait in `queued`. As many as the engine
    # batches: throughput grows with the batch (bench speed at 16 concurrent).
    max_concurrent_runs_per_model: int = Field(16, ge=1)
    # Runs of one key in flight at once (all models). Below the engine's batch, so another
    # key's edit is admitted at once and joins the running batch at the next denoising step.
    # On the CPU a step's cost grows with its batch, so a small share matters: bench load on 2
    # cores, B's single edit (1.0-1.2 s alone) behind A's 48-item batch took 18.4 s at 16,
    # 3.5 s at 4 and 2.2 s at 2, while A's batch took 31.5, 33.1 and 38.7 s. 4 keeps a lone
    # batch's throughput; on a GPU, where a bigger batch costs little more, raise it.
    max_concurrent_runs_per_key: int = Field(4, ge=1)
    # "process": the engine runs in a child process (its own GIL; the server accepts runs
    # while the model loads). "thread": in the server's process, as the tests' doubles do.
    engine_mode: Literal["process", "thread"] = "process"
    # With the engine in its own process: how many nice levels the HTTP process runs below it,
    # so polls and uploads never take a core from the denoising loop (docs/engine.md).
    http_nice: int = Field(5, ge=0, le=19)
    # Requests the engine batches into one denoising step.
    engine_max_batch_size: int = Field(16, ge=1)
    # Step cache for every model: "off" (exact, reproducible in stock diffusers), "fast"
    # (2× fewer transformer passes, ~40 dB from the exact output) or "every,first,last".
    engine_step_cache: str = "off"
    # Serve each model's transformer compiled ahead of time (engine/compiled.py): loaded from
    # compile_dir in under a second when this machine has built it for these weights, else
    # served eagerly while a child process at the lowest CPU priority builds it (minutes), or
    # `incontext warmup` beforehand. A failed build leaves the eager model serving.
    engine_compile: bool = True
    # Where the compiled packages are kept (default: DATA_DIR/compiled).
    compile_dir: Path | None = None
    # Images one key may ask for per minute: a run counts its num_images, a batch all its
    # items' (a batch of 100 × 4 is 400). Refused with 429 and Retry-After.
    rate_limit_per_minute: int = Field(120, ge=1)
    # Images one key may have queued or running at once; past it a create is refused with 429
    # and Retry-After, so one key's backlog stays bounded (admission also takes keys in turn).
    max_active_images_per_key: int = Field(400, ge=1)
    # Run reads (GET of a run, the run list, logs, the BFL get_result) one key may make per
    # minute, 304s included. 100/s: a client with 16 runs in flight polling each every 200 ms
    # stays well inside it, while a loop polling every millisecond is refused. 0: unlimited.
    read_rate_limit_per_minute: int = Field(6000, ge=0)
    progress_log_every_steps: int = Field(5, ge=1)

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # Images decoded at once (each may take width × height × 4 bytes while it decodes).
    max_concurrent_decodes: int = Field(2, ge=1)
    # A request body past this is refused with 413 while it streams in. Inline images are
    # base64 (4/3 of their bytes): the default takes one max_image_bytes image and the rest.
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # The whole fetch of an image_url: resolving, connecting, every read and redirect.
    fetch_timeout_seconds: float = Field(30.0, gt=0)
    # image_url fetches in progress at once, server-wide; more wait (inside their deadline).
    fetch_max_concurrent: int = Field(16, ge=1)
    # Whether image_url and callback_url may point at loopback, private, link-local and other
    # non-public addresses. Off whatever the bind: behind a reverse proxy the app listens on
    # loopback, and its neighbours are what a client must not reach through it.
    fetch_private_networks: bool = False
    # Comma-separated networks allowed even though not public (e.g. an internal image store:
    # 10.20.0.0/16), without opening every private address.
    fetch_allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Times a run may be on the engine when its process dies (killed, out of memory) before
    # the run fails with ENGINE_CRASHED; each death before that queues the run again.
    engine_max_attempts: int = Field(3, ge=1)
    # How long a worker (a server process) holds a run it claimed unless it renews the lease,
    # which it does every third of this while the run is dispatching or running. A worker that
    # stops (killed, frozen, cut off from the database) loses its runs after this long to the
    # reaper every process runs, and they run again elsewhere; each such loss counts towards
    # INCONTEXT_ENGINE_MAX_ATTEMPTS, past which the run fails with WORKER_LOST. Shorter: a dead
    # worker's runs resume sooner; too short: a worker stalled that long (a slow database)
    # loses runs it would have finished, and they run again (their result is written once).
    lease_seconds: float = Field(30.0, ge=1)
    # Whether this process claims runs and drives them on an engine of its own. False: an
    # API-only process (the ingress of `serve --engine ray`), which loads no model, stores
    # runs as queued and leaves them to the workers on the same database (service/apionly.py).
    dispatch: bool = True

    callback_max_attempts: int = Field(6, ge=1)
    callback_backoff_seconds: float = Field(2.0, gt=0)  # delay before attempt 2; doubles after
    callback_backoff_max_seconds: float = Field(600.0, gt=0)
    callback_timeout_seconds: float = Field(10.0, gt=0)
    # A delivery whose process died mid-attempt is tried again this long after the attempt's
    # timeout: long enough that a slow attempt still running elsewhere is not doubled.
    callback_claim_margin_seconds: float = Field(30.0, gt=0)

    # Days a finished run's files (input and output images) are kept; a cleanup job deletes
    # older ones every hour, and their URLs answer 404. The run rows stay (usage, history).
    # 0: keep forever.
    retention_days: float = Field(7.0, ge=0)

    # How often the dispatcher and the callback sender look at the database when nothing
    # woke them (a second process may have written to it).
    poll_interval_seconds: float = Field(1.0, gt=0)

    @field_validator("api_keys", "fetch_allowed_networks", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_model_dirs(cls, value):
        if not isinstance(value, str):
            return value
        pairs = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            model_id, sep, directory = item.partition("=")
            if not sep or not model_id.strip() or not directory.strip():
                raise ValueError(f"INCONTEXT_MODEL_DIRS takes id=directory pairs separated by commas, not {item!r}")
            pairs[model_id.strip()] = directory.strip()
        return pairs

    @field_validator("content_filter")
    @classmethod
    def _check_filter(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        module, sep, name = value.strip().partition(":")
        if not sep or not module or not name.isidentifier():
            raise ValueError(f"INCONTEXT_CONTENT_FILTER must be module:function, not {value!r}")
        return value.strip()

    @field_validator("fetch_allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # a ValueError names the bad one
        return value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        # A short key is guessable; on loopback only the local user can try, elsewhere anyone.
        if not self.local_only:
            weak = [k for k in self.api_keys if len(k) < 20]
            if weak:
                raise ValueError("INCONTEXT_API_KEYS holds keys shorter than 20 characters; refusing to serve them beyond loopback")
            if self.metrics_token is not None and len(self.metrics_token.get_secret_value()) < 20:
                raise ValueError("INCONTEXT_METRICS_TOKEN is shorter than 20 characters; refusing to serve /metrics with it beyond loopback")
        return self

    @property
    def local_only(self) -> bool:
        return is_loopback(self.host)

    @property
    def resolved_compile_dir(self) -> Path:
        return self.compile_dir or self.data_dir / "compiled"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'incontext.db'}"

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
