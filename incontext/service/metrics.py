"""`GET /metrics`: what an operator graphs and alerts on, in Prometheus' text format.

    curl -s http://127.0.0.1:8000/metrics                                   # on loopback
    curl -s -H "Authorization: Bearer $INCONTEXT_METRICS_TOKEN" https://edit.example.com/metrics

Two kinds of numbers:
- read from the database at every scrape, so every process (API replica or worker) reports
  the same truth: `incontext_queue_depth`, `incontext_runs`;
- counted by this process since it started, to be summed over processes in PromQL: engine
  steps, images, lease expiries, requeues, callback deliveries.

Every app has its own `Metrics` (a CollectorRegistry of its own, not prometheus_client's
global one), so several apps in one process (tests, Ray replicas) never collide.

Several processes on one machine (or one shared volume): with PROMETHEUS_MULTIPROC_DIR set
before prometheus_client is imported, as `serve --engine ray` does for its replicas
(rayapp.py), every process writes its counters to files there and `/metrics` of any of them
sums them all: the API replica that a scraper reaches reports the workers' engine steps,
images and requeues, which happen in processes that serve no HTTP. The engine
knows nothing of Prometheus: it reports plain `StepStats` (engine/protocol.py) to
`Metrics.observe_step`.

Who may read it: anyone who can reach a server that listens on loopback (its own machine,
as for `/v1/health`); beyond loopback, only with `Authorization: Bearer` and
INCONTEXT_METRICS_TOKEN, and not at all while that is unset. Not an API key: a key is a
customer's, and these numbers describe every customer's traffic.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Iterator

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from incontext.engine.protocol import StepStats
from incontext.service import lifecycle
from incontext.service.errors import NotFound, Unauthorized
from incontext.service.models import Run
from incontext.settings import Settings

# A tiny model's step on a CPU takes milliseconds, FLUX.1 Kontext's at 1024² on a CPU tens of
# seconds; an H100 step of a full batch is around a second.
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
# Powers of two up to a large engine_max_batch_size: occupancy is rows / INCONTEXT_ENGINE_MAX_BATCH_SIZE.
STEP_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RUN_STATES = (*lifecycle.ACTIVE, *lifecycle.TERMINAL)  # partial_succeeded is a batch's, never a run's
REQUEUE_REASONS = ("lease_expired", "engine_lost", "worker_stopped", "restart")
CALLBACK_OUTCOMES = ("delivered", "retried", "failed")


def runs_by_model_and_state(session: Session) -> dict[tuple[str, str], int]:
    """Runs of every model in every state, server-wide (all keys, all workers): one GROUP BY
    over the indexed status column."""
    rows = session.execute(sa.select(Run.engine_model_id, Run.status, sa.func.count()).group_by(Run.engine_model_id, Run.status))
    return {(model, status): count for model, status, count in rows}


class DatabaseCollector(Collector):
    """Queue depth and runs by state, read at scrape time. Every served model has a series,
    at 0 too, so `incontext_queue_depth == 0` is a fact and not a missing series."""

    def __init__(self, sessions: sessionmaker[Session], model_ids: Iterable[str]):
        self._sessions = sessions
        self._model_ids = tuple(model_ids)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._sessions() as session:
            counts = runs_by_model_and_state(session)
        models = sorted({*self._model_ids, *(model for model, _ in counts)})
        depth = GaugeMetricFamily(
            "incontext_queue_depth", "Runs queued, waiting for a worker (read from the database: every process reports the same).", labels=["model"]
        )
        runs = GaugeMetricFamily("incontext_runs", "Runs in each state, all keys (read from the database: every process reports the same).", labels=["model", "state"])
        for model in models:
            depth.add_metric([model], counts.get((model, lifecycle.QUEUED), 0))
            for state in RUN_STATES:
                runs.add_metric([model, state], counts.get((model, state), 0))
        yield depth
        yield runs


class Metrics:
    """One app's metrics; the dispatcher, the callback sender and the engine's step callback
    feed it. Its methods are safe from any thread (prometheus_client's metrics lock)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram(
            "incontext_engine_step_seconds", "Wall time of one engine step (one transformer pass over the batch and its Euler updates), this process's engine.",
            ["model"], buckets=STEP_SECONDS_BUCKETS, registry=r,
        )
        self.step_rows = Histogram(
            "incontext_engine_step_rows", "Samples (images being denoised) in one engine step's batch: its occupancy, this process's engine.",
            ["model"], buckets=STEP_ROWS_BUCKETS, registry=r,
        )
        self.images = Counter(
            "incontext_images", "Images of runs this process ended as succeeded; images per second is rate(incontext_images_total[1m]).",
            ["model"], registry=r,
        )
        self.lease_expiries = Counter(
            "incontext_lease_expiries", "Runs whose worker stopped renewing their lease, taken back by this process's reaper.", registry=r,
        )
        self.requeues = Counter(
            "incontext_requeues",
            "Runs this process put back in the queue: lease_expired (reaped), engine_lost (its engine process died), "
            "worker_stopped (handed back at shutdown), restart (held by this process's previous life, SQLite).",
            ["reason"], registry=r,
        )
        self.callbacks = Counter(
            "incontext_callback_deliveries",
            "Callback attempts this process made, by outcome: delivered, retried (failed, tried again later), failed (given up).",
            ["outcome"], registry=r,
        )
        for reason in REQUEUE_REASONS:  # a zero is worth showing: no requeues, rather than no data
            self.requeues.labels(reason)
        for outcome in CALLBACK_OUTCOMES:
            self.callbacks.labels(outcome)

        # What a scrape reads: this process's own metrics, or in multi-process mode every
        # process's files (prometheus_client's MultiProcessCollector; this process's metrics are
        # among them, so they must not be registered a second time).
        self.exposed = r
        if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed, path=directory)

    def watch_database(self, sessions: sessionmaker[Session], model_ids: Iterable[str]) -> None:
        """Read queue depth and runs by state from this database at every scrape."""
        self.exposed.register(DatabaseCollector(sessions, model_ids))

    def observe_step(self, stats: StepStats) -> None:
        """The engine's StepCallback: called on its thread after every step."""
        self.step_seconds.labels(stats.model_id).observe(stats.seconds)
        self.step_rows.labels(stats.model_id).observe(stats.rows)

    def run_succeeded(self, model_id: str, images: int) -> None:
        self.images.labels(model_id).inc(images)

    def leases_expired(self, reaped: list[Run]) -> None:
        """After the reaper took `reaped` back: each lost its lease; those queued again are requeues."""
        self.lease_expiries.inc(len(reaped))
        self.requeued("lease_expired", sum(run.status == lifecycle.QUEUED for run in reaped))

    def requeued(self, reason: str, runs: int = 1) -> None:
        self.requeues.labels(reason).inc(runs)

    def callback_attempt(self, outcome: str) -> None:
        self.callbacks.labels(outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.exposed)


router = APIRouter()


def check_access(request: Request, settings: Settings) -> None:
    """See the module docstring: loopback, or the metrics token."""
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if token is None:
        if settings.local_only:
            return
        raise NotFound("/metrics is not served beyond loopback without INCONTEXT_METRICS_TOKEN")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("send INCONTEXT_METRICS_TOKEN as 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": 'Bearer realm="metrics"'})


# Not in the OpenAPI document: it is for the operator's scraper, not the API's clients.
@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """A plain `def`: the scrape's database read runs in the thread pool, off the event loop."""
    service = request.app.state.service
    check_access(request, service.settings)
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)
