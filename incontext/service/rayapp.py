"""incontext as a Ray Serve application: API processes in front, engine workers behind, one
PostgreSQL between them.

    incontext serve --engine ray --replicas 2 --database-url postgresql+psycopg://…
    incontext serve --engine ray --replicas 1 --max-replicas 4 --ray-address auto …
    serve run incontext.service.rayapp:app_builder replicas=2   # env: INCONTEXT_*; KubeRay: deploy/

Two deployments, both built by the one app factory (app.create_app):
- `Api`, the HTTP ingress: stateless API processes (INCONTEXT_DISPATCH=false, apionly.py) that
  store runs as queued and answer for them. They load no model.
- `Worker`: each replica runs the step-batching engine in its own process, on its own GPU
  (or CPU cores, for nano), and a dispatcher that claims runs from the database with leases
  (leases.py). A replica that dies loses its leases and its runs go to the others; one that is
  scaled down drains (`Worker.__del__`).

Runs never travel through Ray: the database is the queue, and a run's input and output files
are in the data dir, which every replica must share (one machine, or a shared volume).
Autoscaling follows the queue (autoscale.py). Every replica counts its metrics into files
under the data dir (PROMETHEUS_MULTIPROC_DIR, metrics.py), so the API's `/metrics` reports
the workers' engine steps too; with INCONTEXT_LOG_FORMAT=json every replica logs JSON.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
from ray.serve.handle import DeploymentHandle

from incontext.service import autoscale, lifecycle, logs
from incontext.service.app import create_app
from incontext.service.models import Run
from incontext.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "incontext"
# How often a worker counts the queue for the autoscaler at most: every replica counts it, so
# this bounds the autoscaler's load on the database to one query per replica per second.
QUEUE_COUNT_EVERY_S = 1.0


class Scaling(BaseModel):
    """The shape of the application: how many workers, on what, and how they scale."""

    replicas: int = Field(1, ge=0)  # workers; with max_replicas, the number to start with
    # Set: the workers autoscale on the queue between min_replicas and max_replicas.
    max_replicas: int | None = Field(None, ge=1)
    min_replicas: int = Field(1, ge=0)  # 0: no worker while nothing is queued (scale to zero)
    # Runs queued or in flight per worker that the autoscaler aims at. Default: what one
    # worker takes at once (INCONTEXT_MAX_CONCURRENT_RUNS_PER_MODEL).
    runs_per_replica: int | None = Field(None, ge=1)
    # Seconds the autoscaler waits before adding or removing workers (Ray Serve's delays).
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    # The window the autoscaler averages the workers' counts over.
    look_back_s: float = Field(30.0, gt=0)
    # A worker being stopped finishes its runs for up to this long, then hands the rest back.
    drain_s: float = Field(60.0, ge=0)
    gpus_per_replica: float = Field(0, ge=0)  # 1 on a GPU cluster: one engine per GPU
    cpus_per_replica: float = Field(1, gt=0)
    api_replicas: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_bounds(self) -> Scaling:
        if self.max_replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"replicas ({self.replicas}) must lie within min_replicas ({self.min_replicas}) and max_replicas ({self.max_replicas})")
        if self.max_replicas is None and self.replicas < 1:
            raise ValueError("with no max_replicas the workers do not autoscale: replicas must be at least 1")
        return self


@serve.deployment
class Worker:
    """One engine and its dispatcher: the whole server's lifespan (create_app with
    INCONTEXT_DISPATCH on) without its HTTP side, which Ray never routes to."""

    async def __init__(self, settings: Settings, drain_s: float):
        # The engine in this process: the replica is the engine's own process already (the
        # child process of engine_mode=process keeps an HTTP server's GIL off the engine;
        # there is none here), and a killed replica takes its engine with it.
        settings = settings.model_copy(update={"dispatch": True, "engine_mode": "thread"})
        _configure_logs(settings)
        self._drain_s = drain_s
        self._app = create_app(settings)
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()
        self._service = self._app.state.service
        self._counted: tuple[float, dict[str, float]] = (0.0, {})

    def wake(self) -> None:
        """Runs were queued: claim now rather than at the next poll."""
        self._service.dispatcher.wake()

    def worker_id(self) -> str:
        """The id this replica's claims carry (runs.worker_id)."""
        return self._service.dispatcher.worker_id

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics, read by autoscale.QueueDepthPolicy."""
        at, counts = self._counted
        if time.monotonic() - at >= QUEUE_COUNT_EVERY_S:
            counts = await asyncio.to_thread(self._count)
            self._counted = (time.monotonic(), counts)
        return counts

    def _count(self) -> dict[str, float]:
        with self._service.read_sessions() as session:
            queued = session.scalar(sa.select(sa.func.count()).select_from(Run).where(Run.status == lifecycle.QUEUED))
            held = session.scalar(
                sa.select(sa.func.count()).select_from(Run)
                .where(Run.status.in_(lifecycle.HELD), Run.worker_id == self._service.dispatcher.worker_id)
            )
        return {autoscale.QUEUED: float(queued), autoscale.HELD: float(held)}

    async def __del__(self):
        # Ray Serve calls this when it stops the replica (downscale, redeploy, shutdown), and
        # kills the process graceful_shutdown_timeout_s after it asked: drain_s plus a margin.
        service = getattr(self, "_service", None)
        if service is None:  # stopped before its start-up finished
            return
        await service.dispatcher.drain(self._drain_s)
        await self._lifespan.__aexit__(None, None, None)


@serve.deployment
@serve.ingress()
class Api:
    """The HTTP API: create_app with INCONTEXT_DISPATCH off."""

    def __init__(self, settings: Settings, workers: DeploymentHandle):
        self._settings = settings.model_copy(update={"dispatch": False})
        self._workers = workers

    def __serve_build_asgi_app__(self):
        _configure_logs(self._settings)
        return create_app(self._settings, on_queued=self._wake_workers)

    def _wake_workers(self) -> None:
        # Not awaited: a worker answers once it has woken its dispatcher, and with no worker
        # running (scaled to zero) the request waits at the handle, which is what makes Ray
        # Serve start one.
        self._workers.wake.remote()


def _configure_logs(settings: Settings) -> None:
    # A replica's process is Ray's: our lines go to its stderr, which Ray keeps in the
    # worker's log file (and shows on the driver). Text is Ray's own format already.
    if settings.log_format == "json":
        logs.configure("json", logging.INFO)


def metrics_dir(settings: Settings) -> Path:
    """Where every replica of this application writes its metrics (metrics.py)."""
    return Path(settings.data_dir) / "metrics"


def build(settings: Settings, scaling: Scaling):
    """The application, ready for serve.run. Clears the metrics files of an earlier run of it:
    counters start again at zero, as a restarted server's do."""
    runs_per_replica = scaling.runs_per_replica or settings.max_concurrent_runs_per_model
    shutil.rmtree(metrics_dir(settings), ignore_errors=True)
    metrics_dir(settings).mkdir(parents=True)
    # Set in each replica's process before anything imports prometheus_client (which reads it then).
    runtime_env = {"env_vars": {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir(settings))}}
    # A worker's torch threads are the CPUs it reserved: two threads in a one-CPU worker ran
    # its edits 2.7x slower than one (bench scale, 2 cores), as cores shared by more thread
    # teams than they hold do (docs/engine.md).
    worker_env = {"env_vars": {**runtime_env["env_vars"], "OMP_NUM_THREADS": str(max(1, int(scaling.cpus_per_replica)))}}
    # Serve's own lines (requests, replica life) in JSON too; its text format is the default.
    log_options = {"logging_config": {"encoding": "JSON"}} if settings.log_format == "json" else {}
    worker_options = {
        "ray_actor_options": {"num_cpus": scaling.cpus_per_replica, "num_gpus": scaling.gpus_per_replica, "runtime_env": worker_env},
        **log_options,
        # The drain, then the release of what is left and the engine's close.
        "graceful_shutdown_timeout_s": scaling.drain_s + 15,
        "graceful_shutdown_wait_loop_s": 1,  # the only requests a worker gets are wake-ups
    }
    if scaling.max_replicas is None:
        worker_options["num_replicas"] = scaling.replicas
    else:
        worker_options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            initial_replicas=scaling.replicas,
            upscale_delay_s=scaling.upscale_delay_s,
            downscale_delay_s=scaling.downscale_delay_s,
            look_back_period_s=scaling.look_back_s,
            policy=AutoscalingPolicy(
                policy_function=autoscale.QueueDepthPolicy, policy_kwargs={"runs_per_replica": runs_per_replica}
            ),
        )
    workers = Worker.options(**worker_options).bind(settings, scaling.drain_s)
    # The API is I/O: it asks for no whole CPU, so it never keeps a worker from its cores.
    return Api.options(
        num_replicas=scaling.api_replicas, ray_actor_options={"num_cpus": 0.1, "runtime_env": runtime_env}, **log_options,
    ).bind(settings, workers)


def app_builder(args: dict[str, str]):
    """For `serve run incontext.service.rayapp:app_builder key=value …` and KubeRay's
    serveConfigV2: settings from INCONTEXT_* in the environment, Scaling from the args."""
    return build(Settings(), Scaling(**args))


def run(settings: Settings, scaling: Scaling, *, ray_address: str | None = None) -> None:
    """Start (or join) a Ray cluster, deploy the application on settings.host:port, and serve
    until SIGINT or SIGTERM."""
    import ray

    if ray_address:
        ray.init(address=ray_address)
    else:
        # A local cluster: the machine's cores, or as many logical CPUs as the most workers
        # ask for (four CPU workers on two cores share them, as `bench scale` measures).
        most = scaling.max_replicas or scaling.replicas
        ray.init(num_cpus=max(os.cpu_count() or 1, int(most * scaling.cpus_per_replica + 1)), include_dashboard=False)
    signal.signal(signal.SIGTERM, _interrupt)  # stopped as by Ctrl-C: the workers drain
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings, scaling), name=APP_NAME, route_prefix="/")
        log.info("serving on %s: %d worker(s)%s", settings.base_url, scaling.replicas,
                 f", autoscaling {scaling.min_replicas}-{scaling.max_replicas}" if scaling.max_replicas else "")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # workers drain: their runs end or go back to the queue
        ray.shutdown()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
