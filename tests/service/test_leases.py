"""Leases on a real (SQLite) database: a worker that lost its lease writes nothing, the reaper
takes runs back and fails them with WORKER_LOST past the last attempt, and two dispatchers on
one database end every run once. (Two server processes on PostgreSQL, one killed mid-run:
tests/service/test_postgres.py.)"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from incontext.engine.protocol import EditRequest, EditResult
from incontext.errors import Cancelled
from incontext.service import leases, lifecycle, store
from incontext.service.keys import create_key
from incontext.service.models import Run

from .helpers import EngineDouble
from .test_dispatcher import InstantEngine, dispatcher_for, queue, rotated_jpeg, service  # noqa: F401 (a fixture)
from .test_lifecycle import db, new_run  # noqa: F401 (a fixture)

SHORT = 0.2  # seconds: a lease that runs out while the test waits


def reap(sessions, storage, max_attempts=3) -> list[Run]:
    with sessions.begin() as s:
        return leases.reap(s, storage, max_attempts)


def test_a_worker_whose_lease_ran_out_and_was_taken_back_cannot_write_its_result(db):
    _, sessions, storage = db
    with sessions.begin() as s:
        key, _ = create_key(s)
        run_id = new_run(s, key.id)
    with sessions.begin() as s:
        (a_run,), _ = leases.claim(s, "a", lease_s=SHORT, cap_per_model=4)
    assert (a_run.worker_id, a_run.fence, a_run.status) == ("a", 1, "dispatching")

    # Slow but not gone: a lease that ran out is still renewed while nobody took the run back.
    time.sleep(SHORT * 1.5)
    with sessions.begin() as s:
        assert leases.renew(s, {run_id: 1}, SHORT) == set()
    assert reap(sessions, storage) == []
    time.sleep(SHORT * 1.5)  # now a stops renewing
    (reaped,) = reap(sessions, storage)
    assert (reaped.status, reaped.worker_id, reaped.engine_crashes) == ("queued", None, 1)
    with sessions.begin() as s:
        (b_run,), _ = leases.claim(s, "b", lease_s=30, cap_per_model=4, ready={run_id})
    assert (b_run.worker_id, b_run.fence, b_run.status) == ("b", 2, "running")

    # a, late: nothing it writes under its fence lands.
    output = {"outputs": [{"url": "a"}]}
    with sessions.begin() as s:
        assert leases.renew(s, {run_id: 1}, 30) == {run_id}
        assert not leases.holds(s, run_id, 1)
        assert lifecycle.mark_running(s, run_id, under_fence=1) is None
        assert lifecycle.finish(s, storage, run_id, lifecycle.SUCCEEDED, output=output, under_fence=1) is None
        assert lifecycle.requeue_lost(s, storage, run_id, 3, "a's engine died", under_fence=1) is None
        assert leases.release(s, {run_id: 1}, "a stops") == []
    # b's end is the one.
    with sessions.begin() as s:
        ended = lifecycle.finish(s, storage, run_id, lifecycle.SUCCEEDED, output={"outputs": [{"url": "b"}]}, under_fence=2)
        assert ended is not None
        assert lifecycle.finish(s, storage, run_id, lifecycle.SUCCEEDED, output=output, under_fence=2) is None
    with sessions() as s:
        run = s.get(Run, run_id)
        assert (run.status, run.worker_id, run.output["outputs"], run.cost_micros) == ("succeeded", "b", [{"url": "b"}], 40_000)
        messages = [log.message for log in store.run_logs(s, run_id)]
    assert messages == ["accepted", "requeued: its worker a stopped renewing its lease (attempt 1 of 3)", "started", "succeeded"]


def test_the_reaper_requeues_an_expired_lease_and_fails_the_run_with_worker_lost_past_the_last_attempt(db):
    _, sessions, storage = db
    with sessions.begin() as s:
        key, _ = create_key(s)
        run_id, live_id = new_run(s, key.id), new_run(s, key.id, "other")
    with sessions.begin() as s:
        leases.claim(s, "a", lease_s=SHORT, cap_per_model=1, cap_per_key=1)
        leases.claim(s, "live", lease_s=30, cap_per_model=1)  # takes live_id: a's run is held
    time.sleep(SHORT * 1.5)
    assert [r.id for r in reap(sessions, storage, max_attempts=2)] == [run_id]  # the live lease stays
    with sessions.begin() as s:
        (claimed,), _ = leases.claim(s, "b", lease_s=SHORT, cap_per_model=1, ready={run_id})  # b starts it, and dies too
    time.sleep(SHORT * 1.5)
    (failed,) = reap(sessions, storage, max_attempts=2)
    assert (failed.id, failed.status, failed.failure_code, failed.failure_stage_code, failed.cost_micros) == (
        run_id, "failed", "WORKER_LOST", "inference", 0
    )
    assert failed.failure_message == "the engine stopped 2 times while it had this run; the last time: its worker b stopped renewing its lease"
    assert reap(sessions, storage) == []
    with sessions() as s:
        assert s.get(Run, live_id).status == "dispatching"
        messages = [log.message for log in store.run_logs(s, run_id)]
    assert messages == ["accepted", "requeued: its worker a stopped renewing its lease (attempt 1 of 2)", "started", "failed"]


class HeldEngine(EngineDouble):
    """Edits nothing until `go` is set, then answers with the input; a cancel ends the edit
    with Cancelled at once, as the engine does at its next step."""

    def __init__(self):
        self.requests: list[EditRequest] = []
        self.canceled: list[str] = []
        self.go = threading.Event()

    async def edit(self, request: EditRequest, on_progress=None) -> EditResult:
        self.requests.append(request)

        def wait() -> EditResult:
            while not self.go.wait(0.01):
                if request.request_id in self.canceled:
                    raise Cancelled("canceled")
            return EditResult([request.image], [request.seed], 1, timings_ms={"total": 0.0})

        return await asyncio.to_thread(wait)

    def cancel(self, request_id: str) -> bool:
        self.canceled.append(request_id)
        return True


def two_workers(service, engine_a, engine_b):
    settings, sessions, storage, key_id = service
    settings = settings.model_copy(update={"lease_seconds": 1.0})
    return tuple(dispatcher_for((settings, sessions, storage, key_id), e) for e in (engine_a, engine_b))


def post_to(dispatcher, service, n: int) -> list[str]:
    """`n` runs accepted by `dispatcher`'s server, claimed with their POST (so no other worker
    sees them queued)."""
    with service[1]() as session:
        queued = [queue(service, session, rotated_jpeg()) for _ in range(n)]
        inputs = {run_id: prepared.run_input for run_id, prepared in queued}
        claimed = dispatcher.claim_within(session, inputs)
        session.commit()
    dispatcher.submitted(inputs, claimed)
    return list(inputs)


async def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


def test_a_stalled_workers_runs_end_once_elsewhere_and_its_late_results_are_dropped(service, caplog):
    """Worker a takes two runs, then stalls (its engine holds them and it cannot reach the
    database to renew): b's reaper takes them back and b runs them. When a's engine finally
    answers, a writes nothing; every run ends once, under b, costed once."""
    engine_a, engine_b = HeldEngine(), InstantEngine()
    a, b = two_workers(service, engine_a, engine_b)
    _, sessions, storage, _ = service

    def cut_off(held):
        raise OSError("the database is unreachable")

    async def scenario() -> list[str]:
        await a.start()
        await b.start()
        try:
            a._renew = cut_off
            run_ids = await asyncio.to_thread(post_to, a, service, 2)
            await wait_until(lambda: len(engine_a.requests) == 2)
            await wait_until(lambda: all(s == "succeeded" for s in statuses(sessions, run_ids)))
            engine_a.go.set()  # a's results arrive, too late
            await wait_until(lambda: not a._in_flight)
            return run_ids
        finally:
            await a.close()
            await b.close()

    with caplog.at_level(logging.WARNING, logger="incontext.service.dispatcher"):
        run_ids = asyncio.run(scenario())
    assert sorted(r.request_id for r in engine_b.requests) == sorted(run_ids)
    with sessions() as s:
        for run_id in run_ids:
            run = s.get(Run, run_id)
            assert (run.status, run.worker_id, run.fence, run.engine_crashes, run.cost_micros) == ("succeeded", b.worker_id, 2, 1, 40_000)
            messages = [log.message for log in store.run_logs(s, run_id)]
            assert messages.count("succeeded") == 1 and messages[-1] == "succeeded", messages
            assert list((storage.outputs / run_id).iterdir())  # b's files: a's drop deleted nothing
    dropped = [r.getMessage() for r in caplog.records if "its lease was lost" in r.getMessage()]
    assert len(dropped) == 2 and all("our result (succeeded) is dropped" in m for m in dropped)


def test_a_run_canceled_through_another_process_stops_on_its_holders_engine(service):
    """Cancel is the run's state in the database: the route of any process writes it, and the
    worker holding the run finds it at its next renewal and stops its engine."""
    engine_a, engine_b = HeldEngine(), InstantEngine()
    a, b = two_workers(service, engine_a, engine_b)
    _, sessions, storage, _ = service

    async def scenario() -> str:
        await a.start()
        await b.start()
        try:
            (run_id,) = await asyncio.to_thread(post_to, a, service, 1)
            await wait_until(lambda: engine_a.requests)

            def cancel_as_b():  # what b's POST /v1/runs/{id}/cancel does; a is not told
                with sessions.begin() as s:
                    lifecycle.cancel(s, storage, s.get(Run, run_id))
                b.cancel(run_id)

            await asyncio.to_thread(cancel_as_b)
            await wait_until(lambda: run_id in engine_a.canceled, timeout=5)  # within a renewal (1/3 s)
            await wait_until(lambda: not a._in_flight)
            return run_id
        finally:
            await a.close()
            await b.close()

    run_id = asyncio.run(scenario())
    assert engine_b.requests == []
    assert statuses(sessions, [run_id]) == ["canceled"]


def statuses(sessions, run_ids: list[str]) -> list[str]:
    with sessions() as s:
        return [s.get(Run, run_id).status for run_id in run_ids]
