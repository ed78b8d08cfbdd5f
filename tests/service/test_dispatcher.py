"""The dispatcher on a real (SQLite) database and storage, with an engine that answers at once:
an accepted run gets the same input whether it was handed over in memory or, after a
restart, read back from storage, and its output keeps the same input's pixels."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from incontext import imageio
from incontext.engine.protocol import EditRequest, EditResult, StepProgress
from incontext.errors import Cancelled, EngineLost, IncontextError
from incontext.models.registry import ModelPreset
from incontext.service import inputs, keys, lifecycle, store, submission
from incontext.service.db import create_db_engine, make_session_factory, migrate
from incontext.service.dispatcher import Dispatcher
from incontext.service.models import Run
from incontext.service.schemas import KontextInput
from incontext.service.storage import Storage
from incontext.settings import Settings

from .helpers import data_uri

PRESET = ModelPreset("m", Path("unused"), num_inference_steps=3, target_area=64 * 64)


class InstantEngine:
    """Answers every edit at once with its input; keeps the requests it was given. With
    `change_maps`, reports (as the local engine does) that no latent moved."""

    def __init__(self, change_maps: bool = False):
        self.requests: list[EditRequest] = []
        self.change_maps = change_maps

    async def edit(self, request: EditRequest, on_progress=None) -> EditResult:
        self.requests.append(request)
        steps = request.num_inference_steps

        def denoise() -> EditResult:  # on a thread of its own, as the engines report progress
            for step in range(1, steps + 1):
                on_progress(StepProgress(step, steps))
            unmoved = [np.zeros((request.height // 16, request.width // 16), np.float32)] if self.change_maps else []
            return EditResult([request.image], [request.seed], steps, timings_ms={"total": 0.0}, change_maps=unmoved)

        return await asyncio.to_thread(denoise)

    def cancel(self, request_id: str) -> bool:
        return False


class NoCallbacks:
    def wake(self) -> None:
        pass


@pytest.fixture
def service(tmp_path):
    settings = Settings(data_dir=tmp_path, poll_interval_seconds=0.05, progress_log_every_steps=2)
    engine = create_db_engine(settings.resolved_database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    storage = Storage(tmp_path, secret=b"s", base_url="http://x", ttl_seconds=60)
    with sessions.begin() as session:
        key, _ = keys.create_key(session)
    yield settings, sessions, storage, key.id
    engine.dispose()


def rotated_jpeg() -> str:
    """A JPEG stored sideways with an EXIF orientation, not at the output size: decoding it
    takes the EXIF turn and a resize, so two decodings that differed would show."""
    img = Image.new("RGB", (90, 60), (200, 40, 40))
    img.paste((20, 20, 220), (0, 0, 30, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return data_uri(buf.getvalue(), "image/jpeg")


def queue(service, session, image_url: str, legacy: bool = False, **fields) -> tuple[str, submission.PreparedRun]:
    """A run queued in `session`'s open transaction, as POST /v1/models/{model}/runs queues it.
    `legacy`: its params as stored before runs recorded what an output keeps of the input."""
    settings, _, storage, key_id = service
    item = KontextInput(prompt="make it blue", image_url=image_url, seed=7, num_inference_steps=3, **fields)
    prepared = submission.prepare(item, field="input", preset=PRESET, api_key_id=key_id, session=session, storage=storage, settings=settings)
    run = submission.queue(session, storage, prepared)
    if legacy:
        old = {k: v for k, v in run.params.items() if k not in ("aspect_ratio", "preserve", "return_mask")}
        session.execute(sa.update(Run).where(Run.id == run.id).values(params=old))
    return run.id, prepared


def accept(service, image_url: str, **fields) -> tuple[str, submission.PreparedRun]:
    """What POST /v1/models/{model}/runs did before runs were claimed with it: a committed, queued run."""
    with service[1]() as session:
        run_id, prepared = queue(service, session, image_url, **fields)
        session.commit()
    return run_id, prepared


def dispatcher_for(service, engine) -> Dispatcher:
    settings, sessions, storage, _ = service
    return Dispatcher(sessions=sessions, engine=engine, storage=storage, sender=NoCallbacks(), settings=settings)


async def run_until_done(service, dispatcher: Dispatcher, run_ids: list[str]) -> None:
    """Start the dispatcher (as a server start does) and wait for the runs to succeed."""
    await dispatcher.start()
    deadline = time.monotonic() + 60
    try:
        while statuses(service, run_ids) != ["succeeded"] * len(run_ids):
            assert time.monotonic() < deadline, statuses(service, run_ids)
            await asyncio.sleep(0.02)
    finally:
        await dispatcher.close()


def statuses(service, run_ids: list[str]) -> list[str]:
    with service[1]() as session:
        return [session.get(Run, run_id).status for run_id in run_ids]


def test_a_run_whose_input_was_not_handed_over_runs_from_storage_the_same(service):
    engine = InstantEngine()
    # Accepted, then the server stops before the dispatcher took it: the input in memory is lost.
    lost_id, _ = accept(service, rotated_jpeg())
    # The next start: a run accepted now is handed over.
    dispatcher = dispatcher_for(service, engine)
    handed_id, handed = accept(service, rotated_jpeg())
    dispatcher.submitted({handed_id: handed.run_input})
    asyncio.run(run_until_done(service, dispatcher, [lost_id, handed_id]))

    by_id = {r.request_id: r for r in engine.requests}
    from_storage, from_memory = by_id[lost_id].image, by_id[handed_id].image
    assert from_storage.size == from_memory.size == (handed.params.width, handed.params.height)
    assert from_storage.size[0] < from_storage.size[1]  # the EXIF turn was taken
    assert from_storage.tobytes() == from_memory.tobytes()

    _, sessions, storage, _ = service
    with sessions() as session:
        for run_id in (lost_id, handed_id):
            messages = [log.message for log in store.run_logs(session, run_id)]
            assert messages == ["accepted", "started", "step 2/3", "step 3/3", "succeeded"]
            run = session.get(Run, run_id)
            assert run.started_at is not None and run.cost_micros == 40_000
            assert storage.has_input(run_id)  # kept with the outputs, until retention deletes both


def test_a_run_canceled_before_it_is_claimed_never_reaches_the_engine(service):
    engine = InstantEngine()
    dispatcher = dispatcher_for(service, engine)
    (canceled_id, canceled), (other_id, other) = accept(service, rotated_jpeg()), accept(service, rotated_jpeg())
    dispatcher.submitted({canceled_id: canceled.run_input, other_id: other.run_input})
    _, sessions, storage, _ = service
    with sessions.begin() as session:  # as POST /v1/runs/{id}/cancel does
        lifecycle.cancel(session, storage, session.get(Run, canceled_id))
    storage.delete_input(canceled_id)
    dispatcher.cancel(canceled_id)
    asyncio.run(run_until_done(service, dispatcher, [other_id]))
    assert [r.request_id for r in engine.requests] == [other_id]
    assert statuses(service, [canceled_id]) == ["canceled"]


def test_a_run_claimed_with_its_post_starts_at_that_commit_and_not_without_it(service):
    """POST /v1/models/{model}/runs claims its run in the transaction that inserts it: the run
    is running once that commits, and a commit that fails (e.g. an Idempotency-Key race lost
    to another request) takes the claim with it, so nothing reaches the engine."""
    sessions = service[1]
    engine = InstantEngine()
    dispatcher = dispatcher_for(service, engine)

    def post(commit: bool) -> str:
        with sessions() as session:
            run_id, prepared = queue(service, session, rotated_jpeg())
            claimed = dispatcher.claim_within(session, {run_id: prepared.run_input})
            assert [run.id for run in claimed] == [run_id]
            if not commit:
                session.rollback()
                return run_id
            session.commit()
        assert statuses(service, [run_id]) == ["running"]  # before the dispatcher was told
        dispatcher.submitted({run_id: prepared.run_input}, claimed)
        return run_id

    async def scenario() -> tuple[str, str]:
        await dispatcher.start()
        try:
            lost_id = await asyncio.to_thread(post, False)
            kept_id = await asyncio.to_thread(post, True)
            deadline = time.monotonic() + 60
            while statuses(service, [kept_id]) != ["succeeded"]:
                assert time.monotonic() < deadline, statuses(service, [kept_id])
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # a few more polls of the dispatcher's loop
            return lost_id, kept_id
        finally:
            await dispatcher.close()

    lost_id, kept_id = asyncio.run(scenario())
    assert [r.request_id for r in engine.requests] == [kept_id]
    with sessions() as session:
        assert session.get(Run, lost_id) is None
        assert [log.message for log in store.run_logs(session, kept_id)] == ["accepted", "started", "step 2/3", "step 3/3", "succeeded"]


def test_outputs_keep_the_input_at_its_own_size_from_memory_or_storage(service):
    """Where the engine reports that nothing moved, the output is the input itself, pixel for
    pixel, at the input's size (not the model's): for a run handed over in memory, and for one
    read back from storage after a restart whose params predate preservation (read as "auto")."""
    image_url = rotated_jpeg()
    engine = InstantEngine(change_maps=True)
    lost_id, _ = accept(service, image_url, legacy=True, output_format="png")
    dispatcher = dispatcher_for(service, engine)
    handed_id, handed = accept(service, image_url, output_format="png", return_mask=True)
    dispatcher.submitted({handed_id: handed.run_input})
    asyncio.run(run_until_done(service, dispatcher, [lost_id, handed_id]))

    source = imageio.decode_data_uri(image_url)
    params = handed.params
    assert source.size == (60, 90) and engine.requests[0].image.size == (params.width, params.height) != source.size
    _, sessions, storage, _ = service
    with sessions() as session:
        for run_id in (lost_id, handed_id):
            (out,) = session.get(Run, run_id).output["outputs"]
            assert (out["width"], out["height"], out["changed_share"]) == (60, 90, 0.0)
            kept = Image.open(storage.output_path(out["file"]))
            assert kept.size == source.size and kept.tobytes() == source.tobytes()
            assert ("mask_file" in out) == (run_id == handed_id)  # asked for with return_mask only
        mask = session.get(Run, handed_id).output["outputs"][0]["mask_file"]
    assert Image.open(storage.output_path(mask)).getextrema() == (0, 0)  # no pixel is the model's
    storage.delete_outputs(handed_id)  # as when a cancel wins over the finished run
    assert not (storage.outputs / handed_id).exists()


def test_a_large_source_waits_as_its_fitted_image_only_and_is_composed_from_storage(service, monkeypatch):
    """An accepted input larger than KEEP_SOURCE_PIXELS (a palette bomb, a 40 MP photo) waits
    in memory only at the model's size: the output is still the input at its own size, read
    back from the stored input when the output is composed."""
    monkeypatch.setattr(inputs, "KEEP_SOURCE_PIXELS", 59 * 90)  # the 60×90 input counts as large
    image_url = rotated_jpeg()
    engine = InstantEngine(change_maps=True)
    dispatcher = dispatcher_for(service, engine)
    run_id, prepared = accept(service, image_url, output_format="png")
    given = prepared.run_input
    params = prepared.params
    assert given.source is None and given.source_size == (60, 90)
    assert given.pixels == params.width * params.height  # what the engine needs, nothing more
    dispatcher.submitted({run_id: given})
    asyncio.run(run_until_done(service, dispatcher, [run_id]))

    source = imageio.decode_data_uri(image_url)
    _, sessions, storage, _ = service
    with sessions() as session:
        (out,) = session.get(Run, run_id).output["outputs"]
    assert (out["width"], out["height"], out["changed_share"]) == (60, 90, 0.0)
    assert Image.open(storage.output_path(out["file"])).tobytes() == source.tobytes()


class DyingEngine(InstantEngine):
    """Loses its first `deaths` requests as ProcessEngine does when its child dies with them."""

    def __init__(self, deaths: int):
        super().__init__()
        self.deaths = deaths

    async def edit(self, request: EditRequest, on_progress=None) -> EditResult:
        if self.deaths:
            self.deaths -= 1
            self.requests.append(request)
            raise EngineLost("the engine process stopped during the request (exit code -9)")
        return await super().edit(request, on_progress)


async def run_until_ended(service, dispatcher: Dispatcher, run_ids: list[str]) -> None:
    await dispatcher.start()
    deadline = time.monotonic() + 60
    try:
        while any(s in lifecycle.ACTIVE for s in statuses(service, run_ids)):
            assert time.monotonic() < deadline, statuses(service, run_ids)
            await asyncio.sleep(0.02)
    finally:
        await dispatcher.close()


def test_a_run_the_engine_dies_with_is_queued_again_then_succeeds(service):
    engine = DyingEngine(deaths=2)  # INCONTEXT_ENGINE_MAX_ATTEMPTS is 3
    dispatcher = dispatcher_for(service, engine)
    run_id, prepared = accept(service, rotated_jpeg())
    dispatcher.submitted({run_id: prepared.run_input})
    asyncio.run(run_until_ended(service, dispatcher, [run_id]))

    assert [r.request_id for r in engine.requests] == [run_id] * 3
    # Every try got the input handed over in memory, not re-read from storage.
    assert all(r.image.tobytes() == engine.requests[0].image.tobytes() for r in engine.requests)
    _, sessions, storage, _ = service
    with sessions() as session:
        run = session.get(Run, run_id)
        assert (run.status, run.engine_crashes, run.failure_code) == ("succeeded", 2, None)
        messages = [log.message for log in store.run_logs(session, run_id)]
    requeued = "requeued: the engine process stopped during the request (exit code -9)"
    assert messages == [
        "accepted", "started", f"{requeued} (attempt 1 of 3)", "started", f"{requeued} (attempt 2 of 3)",
        "started", "step 2/3", "step 3/3", "succeeded",
    ]
    assert storage.has_input(run_id)  # kept with the outputs, until retention deletes both


def test_a_run_the_engine_keeps_dying_with_fails_cleanly_after_the_last_attempt(service):
    engine = DyingEngine(deaths=10**6)
    dispatcher = dispatcher_for(service, engine)
    run_id, prepared = accept(service, rotated_jpeg())
    dispatcher.submitted({run_id: prepared.run_input})
    asyncio.run(run_until_ended(service, dispatcher, [run_id]))

    assert len(engine.requests) == 3
    _, sessions, storage, _ = service
    with sessions() as session:
        run = session.get(Run, run_id)
        assert (run.status, run.engine_crashes, run.failure_code, run.failure_stage_code, run.cost_micros) == (
            "failed", 3, "ENGINE_CRASHED", "inference", 0
        )
        assert run.failure_message.startswith("the engine stopped 3 times while it had this run")
    assert storage.has_input(run_id)  # kept until retention, as a run's input always is


class OneAtATimeEngine(InstantEngine):
    """Edits one request at a time, `seconds` each, in the order it is given them: a busy
    engine whose every slot another key could fill."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.ended: list[str] = []
        self._lock: asyncio.Lock | None = None

    async def edit(self, request: EditRequest, on_progress=None) -> EditResult:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            await asyncio.sleep(self.seconds)
            result = await super().edit(request, on_progress)
            self.ended.append(request.request_id)
            return result


def test_another_keys_single_edit_ends_well_before_a_keys_backlog(service):
    """Key A's 12 runs fill the model's slots (2) before key B sends one edit: B's edit is
    the next run to start when a slot frees, not the 13th, so it ends among the first few."""
    settings, sessions, storage, key_a = service
    settings = settings.model_copy(update={"max_concurrent_runs_per_model": 2})
    with sessions.begin() as session:
        key_b = keys.create_key(session)[0].id
    as_a, as_b = (settings, sessions, storage, key_a), (settings, sessions, storage, key_b)
    image_url = rotated_jpeg()
    engine = OneAtATimeEngine(seconds=0.05)
    backlog = [accept(as_a, image_url)[0] for _ in range(12)]
    dispatcher = dispatcher_for(as_a, engine)

    async def scenario() -> str:
        await dispatcher.start()
        try:
            while len(engine.requests) < 1:  # A's first runs hold both slots
                await asyncio.sleep(0.01)
            mine, _ = await asyncio.to_thread(accept, as_b, image_url)
            dispatcher.wake()
            deadline = time.monotonic() + 60
            while any(s != "succeeded" for s in statuses(as_a, [*backlog, mine])):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            return mine
        finally:
            await dispatcher.close()

    mine = asyncio.run(scenario())
    assert engine.ended.index(mine) <= 3, engine.ended.index(mine)  # was 12th: after all of A's
    assert engine.ended[-1] == backlog[-1]


class DrawingFailsEngine(InstantEngine):
    """A workflow's removal that runs until it is cancelled, beside a drawing that fails."""

    def __init__(self):
        super().__init__()
        self.cancelled: set[str] = set()

    async def edit(self, request: EditRequest, on_progress=None) -> EditResult:
        self.requests.append(request)
        if request.request_id.endswith("/select"):
            await asyncio.sleep(0.1)
            raise IncontextError("the drawing failed", code="DRAWING_FAILED")
        while request.request_id not in self.cancelled:
            await asyncio.sleep(0.01)
        raise Cancelled(f"request {request.request_id} was cancelled")

    def cancel(self, request_id: str) -> bool:
        self.cancelled.add(request_id)
        return True


def test_a_workflow_run_whose_second_edit_fails_stops_its_first_and_fails_with_its_code(service):
    engine = DrawingFailsEngine()
    dispatcher = dispatcher_for(service, engine)
    run_id, prepared = accept(service, rotated_jpeg())
    with service[1].begin() as session:  # as a segmentation's plan stores it (RunParams.select_prompt)
        run = session.get(Run, run_id)
        session.execute(sa.update(Run).where(Run.id == run_id).values(params={**run.params, "select_prompt": "make a mask of the cup"}))
    dispatcher.submitted({run_id: prepared.run_input})

    async def scenario() -> None:
        await dispatcher.start()
        deadline = time.monotonic() + 30
        try:
            while statuses(service, [run_id]) != ["failed"]:
                assert time.monotonic() < deadline, statuses(service, [run_id])
                await asyncio.sleep(0.02)
        finally:
            await dispatcher.close()

    asyncio.run(scenario())
    assert sorted(r.prompt for r in engine.requests) == ["make a mask of the cup", "make it blue"]
    assert run_id in engine.cancelled  # the removal did not run on after its drawing failed
    with service[1]() as session:
        run = session.get(Run, run_id)
        assert (run.failure_code, run.failure_stage_code) == ("DRAWING_FAILED", "inference")


def test_a_workflow_that_turns_true_cfg_off_asks_the_engine_without_it(service):
    engine = InstantEngine(change_maps=True)
    dispatcher = dispatcher_for(service, engine)
    plain_id, plain = accept(service, rotated_jpeg())
    removal_id, removal = accept(service, rotated_jpeg())
    with service[1].begin() as session:  # as the object-removal workflow's plan stores it (RunParams.workflow)
        run = session.get(Run, removal_id)
        session.execute(sa.update(Run).where(Run.id == removal_id).values(params={**run.params, "workflow": "object-removal"}))
    dispatcher.submitted({plain_id: plain.run_input, removal_id: removal.run_input})

    async def scenario() -> None:
        await dispatcher.start()
        deadline = time.monotonic() + 30
        try:
            while len(engine.requests) < 2:
                assert time.monotonic() < deadline, engine.requests
                await asyncio.sleep(0.02)
        finally:
            await dispatcher.close()

    asyncio.run(scenario())
    assert {r.request_id: r.true_cfg for r in engine.requests} == {plain_id: True, removal_id: False}
