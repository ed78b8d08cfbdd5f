"""Replicate's webhook events before a run's end (start, logs, output), on a real (SQLite)
database without the engine: which are queued, the `logs` throttle, and one run's deliveries
going out one at a time in order."""

import json

import pytest

import incontext.service.routes.replicate  # noqa: F401 (registers the Replicate callback style)
from incontext.service import callbacks, lifecycle
from incontext.service.callbacks import CallbackSender
from incontext.service.db import create_db_engine, make_session_factory, migrate
from incontext.service.keys import create_key
from incontext.service.models import CallbackDelivery
from incontext.service.netpolicy import NetPolicy
from incontext.service.storage import Storage


@pytest.fixture
def db(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    yield make_session_factory(engine), Storage(tmp_path, secret=b"s", base_url="http://x", ttl_seconds=60)
    engine.dispose()


def replicate_run(session, events):
    key_id = create_key(session, "k")[0].id
    params = {
        "prompt": "p", "seed": 1, "num_images": 1, "guidance_scale": 3.5, "num_inference_steps": 4, "output_format": "png",
        "width": 16, "height": 16, "unit_price_micros": 40_000, "callback_style": "replicate", "webhook_events": events,
        "requested_model_id": "black-forest-labs/flux-kontext-pro",
    }
    return lifecycle.create_run(
        session, api_key_id=key_id, model_id="m", engine_model_id="m", input={"prompt": "p"}, params=params, callback_url="http://hook"
    )


def queued_events(session, run_id):
    rows = session.query(CallbackDelivery).filter_by(run_id=run_id).order_by(CallbackDelivery.id).all()
    return [(d.event, json.loads(d.body)["status"]) for d in rows]


def test_events_follow_the_filter_and_logs_are_throttled(db):
    sessions, storage = db
    with sessions() as session:
        run = replicate_run(session, ["start", "logs", "output", "completed"])
        assert callbacks.enqueue_event(session, run, "start", storage) is not None
        lifecycle.mark_running(session, run.id, from_states=(lifecycle.QUEUED,))
        lifecycle.add_log(session, run.id, "step 5/20", meta={"step": 5, "total_steps": 20})
        logs = callbacks.enqueue_event(session, run.id, "logs", storage)
        assert logs is not None and " 25%|" in json.loads(logs.body)["logs"]  # the lines so far, as tqdm
        assert callbacks.enqueue_event(session, run.id, "logs", storage) is None  # within 0.5 s of the last
        lifecycle.finish(session, storage, run.id, lifecycle.FAILED, failure=("X", "broke", "inference"))
        assert callbacks.enqueue_event(session, run.id, "logs", storage) is None  # ended: the end's body has every line
        # A failed run has no output: no `output` event, only the end.
        assert queued_events(session, run.id) == [("start", "starting"), ("logs", "processing"), ("run.failed", "failed")]

        quiet = replicate_run(session, ["completed"])
        assert callbacks.enqueue_event(session, quiet, "start", storage) is None
        lifecycle.mark_running(session, quiet.id, from_states=(lifecycle.QUEUED,))
        assert callbacks.enqueue_event(session, quiet.id, "logs", storage) is None
        lifecycle.cancel(session, storage, session.get(type(quiet), quiet.id))
        assert queued_events(session, quiet.id) == [("run.cancelled", "canceled")]

        none = replicate_run(session, [])  # an empty filter asks for nothing
        lifecycle.finish(session, storage, none.id, lifecycle.CANCELED)
        assert queued_events(session, none.id) == []
        session.commit()


def test_one_runs_deliveries_go_one_at_a_time_in_order(db):
    sessions, storage = db
    with sessions() as session:
        run = replicate_run(session, None)  # no filter: every event
        callbacks.enqueue_event(session, run, "start", storage)
        lifecycle.finish(session, storage, run.id, lifecycle.CANCELED)
        other = replicate_run(session, None)
        callbacks.enqueue_event(session, other, "start", storage)
        session.commit()
        first, last = session.query(CallbackDelivery).filter_by(run_id=run.id).order_by(CallbackDelivery.id).all()
        other_start = session.query(CallbackDelivery).filter_by(run_id=other.id).one()
    sender = CallbackSender(sessions, max_attempts=3, backoff_s=1, backoff_max_s=1, timeout_s=1, poll_s=1, policy=NetPolicy())
    due = {d for d, _ in sender._due()}
    assert first.id in due and other_start.id in due and last.id not in due  # the end waits for the start
    sender._record(first.id, 500, 1, "receiver answered HTTP 500")  # a retry is pending: still first in line
    assert last.id not in {d for d, _ in sender._due()}
    with sessions.begin() as session:
        session.get(CallbackDelivery, first.id).status = "delivered"
    assert last.id in {d for d, _ in sender._due()}
