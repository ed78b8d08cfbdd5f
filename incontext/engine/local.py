"""The in-process engine: one thread runs denoising steps for every request at once.

One engine step is three calls with plain data between them:
    batch = scheduler.schedule()        # which samples run (pure bookkeeping)
    step = runner.execute(batch, jobs)  # prepare new samples' inputs, one transformer pass
    runner.apply(batch, step, jobs)     # the Euler update of every sample
    finished = scheduler.update(batch)  # advance counters; finished samples are decoded
This module is the loop around it: the thread, the inbox, admission and finishing requests.
What a step does with tensors is the runner's (engine/runner.py), through the model's
family adapter (engine/families).
Requests join and leave the running batch at step boundaries; cancellation takes effect
at the next one. Each sample keeps its own noise, timestep, guidance, prompt and context,
so what else is in the batch never changes a result (beyond the float rounding of CPU
matmul kernels, which block differently for other batch sizes: ~1e-6, at most one pixel
level here and there).

With a step cache (`LocalEngine(..., step_cache="fast")`, see `engine/stepcache.py`) a
sample runs the transformer only at the steps its schedule names; on the others it reuses
its last velocity and is left out of that step's transformer batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from incontext.engine import preview, stepcache
from incontext.engine.protocol import MAX_IMAGES, EditRequest, EditResult, ProgressCallback, StepCallback, StepProgress, StepStats
from incontext.engine.runner import Job, Runner
from incontext.engine.scheduler import SampleStatus, Sample, ScheduledBatch, Scheduler
from incontext.engine.stepcache import StepCacheConfig
from incontext.errors import Cancelled, IncontextError, InvalidInput, ModelError
from incontext.models.registry import MAX_CONSENSUS, Registry

log = logging.getLogger(__name__)


class LocalEngine:
    def __init__(self, registry: Registry, *, max_batch_size: int = 8, dtype: str = "auto", device: str = "cpu",
                 text_cache: int = 256, image_cache: int = 64, reuse_output_latents: bool = True,
                 step_cache: StepCacheConfig | str | None = None, compile_dir: Path | None = None,
                 on_step: StepCallback | None = None):
        """`step_cache`: None for the exact sampler, a preset name ("fast") or a StepCacheConfig,
        for every model; `set_step_cache` changes it, also for one model only. `compile_dir`:
        where each loaded model's ahead-of-time compiled transformer is kept (engine/compiled.py);
        it is loaded from there, or built there at the lowest priority while the engine serves
        eagerly. None: eager only. `on_step`: told every step's StepStats, on the engine's thread."""
        self.registry = registry
        self.scheduler = Scheduler(max_batch_size)
        self.runner = Runner(dtype=dtype, device=device, text_cache=text_cache, image_cache=image_cache,
                             reuse_output_latents=reuse_output_latents, compile_dir=compile_dir)
        # The runner's, named here too: benchmarks share loaded models between engines, and
        # tests and benchmarks read the counters.
        self.models, self.compiled, self.stats = self.runner.models, self.runner.compiled, self.runner.stats
        self.text_cache, self.latent_cache = self.runner.text_cache, self.runner.latent_cache
        self.step_cache = stepcache.resolve(step_cache)
        self._model_step_cache: dict[str, StepCacheConfig | None] = {}
        self._jobs: dict[str, Job] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.on_step = on_step
        self.load_error: Exception | None = None  # why the model of start() did not load

    # ------------------------------------------------------------ client interface

    async def start(self) -> None:
        self.start_thread(preload=self.registry.default_id)
        await asyncio.to_thread(self._ready.wait)
        if self.load_error is not None:
            raise self.load_error

    def start_thread(self, preload: str | None = None) -> None:
        """Start the engine's thread. With `preload`, the thread loads that model first and
        `is_ready()` turns true once it is loaded (or failed to: `load_error`, and the thread ends).

        Every torch operation of the engine runs on this one thread, loading included. With
        libgomp (torch's OpenMP on Linux), once two live threads of a process have each run
        parallel work, their thread teams outnumber the cores and the workers stop spinning
        between parallel regions: every small op then pays a futex wake-up. On 2 cores that
        made each op about 10× slower (an add of 40k floats 6 → 84 µs) and a batch-1
        transformer pass 2× slower, for as long as the other thread lived."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(preload,), name="incontext-engine", daemon=True)
            self._thread.start()
        if preload is None:
            self._ready.set()

    def _run(self, preload: str | None) -> None:
        if preload is not None:
            try:
                self.load(preload)
            except Exception as e:
                log.exception("could not load model %s", preload)
                self.load_error = e
                self._ready.set()
                return
            self._ready.set()
        self._loop()

    def stop(self) -> None:
        """Ask the loop to end after its current step (any thread)."""
        self._stop.set()
        self._inbox.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop's thread to end; True if it ended because `stop` was called."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._stop.is_set()

    async def close(self) -> None:
        self.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def is_ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the thread's preload has ended (loaded, or failed: `load_error`)."""
        return self._ready.wait(timeout)

    def submit(self, request: EditRequest, on_progress: ProgressCallback | None = None) -> Future:
        """Queue a request; the future resolves to an EditResult (or raises Cancelled/IncontextError)."""
        fut: Future = Future()
        self._inbox.put((request, fut, on_progress, time.perf_counter()))
        return fut

    async def edit(self, request: EditRequest, on_progress: ProgressCallback | None = None) -> EditResult:
        return await asyncio.wrap_future(self.submit(request, on_progress))

    def cancel(self, request_id: str) -> bool:
        self._inbox.put(("cancel", request_id))
        return True

    def load(self, model_id: str):
        """Load a model (an id, an alias or a directory) on this thread; its loaded modules."""
        return self.runner.load(self.registry.resolve(model_id))

    def set_step_cache(self, spec: StepCacheConfig | str | None, model_id: str | None = None) -> None:
        """Use a step cache (a config, a preset name such as "fast", or None/"off" for the exact
        sampler) for requests admitted from now on: of every model, or of `model_id` only.
        Requests already admitted keep the schedule they started with."""
        config = stepcache.resolve(spec)
        if model_id is None:
            self.step_cache = config
            self._model_step_cache.clear()
        else:
            self._model_step_cache[self.registry.resolve(model_id).id] = config

    def step_cache_for(self, model_id: str) -> StepCacheConfig | None:
        return self._model_step_cache.get(self.registry.resolve(model_id).id, self.step_cache)

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=not self.scheduler.has_work())
            if self._stop.is_set():
                break
            batch = self.scheduler.schedule()
            if not batch.samples:
                self.runner.idle()
                continue
            t0 = time.perf_counter()
            try:
                step = self.runner.execute(batch, self._jobs)
            except Exception as e:  # a broken request must not take the engine down
                log.exception("engine step failed")
                for job in {self._jobs[s.request_id] for s in batch.samples if s.request_id in self._jobs}:
                    self._finish(job, error=e if isinstance(e, IncontextError) else IncontextError(f"inference failed: {e}"))
                continue
            self.runner.apply(batch, step, self._jobs)
            finished = self.scheduler.update(batch)
            seconds = time.perf_counter() - t0
            self.stats.busy_seconds += seconds
            self._report_step(StepStats(model_id=batch.bucket[0], seconds=seconds, rows=len(batch.samples)))
            self._after_update(batch, finished)
        self.runner.close()

    def _report_step(self, stats: StepStats) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(stats)
        except Exception:  # a watcher's bug must not stop the engine
            log.exception("step callback failed")

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            if item[0] == "cancel":
                self._cancel(item[1])
            else:
                self._admit(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, request: EditRequest, fut: Future, on_progress, submitted: float) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            preset = self.registry.resolve(request.model_id)
            m = self.runner.load(preset)
            steps = request.num_inference_steps or preset.num_inference_steps
            draws = request.consensus or preset.consensus
            if not 1 <= draws <= MAX_CONSENSUS:
                raise InvalidInput(f"consensus must be 1 to {MAX_CONSENSUS} draws per image, not {draws}")
            mult = m.vae_scale_factor * 2
            if request.width % mult or request.height % mult:
                raise InvalidInput(f"output size {request.width}×{request.height} must be a multiple of {mult}")
            if 1 + len(request.references) > MAX_IMAGES:
                raise InvalidInput(f"at most {MAX_IMAGES} images per request, the edited one included")
            if 1 + len(request.references) > (most := self.runner.families[preset.id].max_images):
                raise InvalidInput(f"model {preset.id!r} takes at most {most} image(s) per request, the edited one included")
            if any(im.size != (request.width, request.height) for im in (request.image, *request.references)):
                raise InvalidInput("the context image and every reference image must already be at the output size")
        except IncontextError as e:
            fut.set_exception(e)
            return
        except Exception as e:  # a model that fails to load must fail its request, not the engine thread
            log.exception("could not admit request %s", request.request_id)
            fut.set_exception(ModelError(f"could not load model {request.model_id!r}: {e.__class__.__name__}: {e}"))
            return
        if request.thing_mask:
            try:
                answered = self.runner.mask(preset, request)
            except Exception as e:  # as a failed step: the request fails, the engine goes on
                log.exception("mask request %s failed", request.request_id)
                fut.set_exception(IncontextError(f"inference failed: {e}"))
                return
            if answered is not None:
                answered.timings_ms["total"] = (time.perf_counter() - submitted) * 1000
                fut.set_result(answered)
                return
        bucket = (preset.id, request.width, request.height, 1 + len(request.references))
        job = Job(request, fut, on_progress, preset.id, steps, draws=draws, started=submitted)
        cache = self._model_step_cache.get(preset.id, self.step_cache)
        if cache is not None and cache.evals(steps) < steps:
            job.compute_steps = cache.compute_steps(steps)
        job.samples = [Sample(request.request_id, i, bucket, steps, owner=request.owner) for i in range(request.num_images * draws)]
        self._jobs[request.request_id] = job
        self.scheduler.add(job.samples)

    def _cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)
        job = self._jobs.get(request_id)
        if job is not None:
            self._finish(job, error=Cancelled(f"request {request_id} was cancelled"))

    def _after_update(self, batch: ScheduledBatch, finished: list[Sample]) -> None:
        for job in {id(self._jobs[s.request_id]): self._jobs[s.request_id] for s in batch.samples if s.request_id in self._jobs}.values():
            if job.on_progress is not None:
                done = min(s.step for s in job.samples)
                shown = self.runner.preview(job) if preview.due(done, job.steps, job.request.previews) else None
                try:
                    job.on_progress(StepProgress(done, job.steps, shown))
                except Exception:  # a client's callback must not stop the engine
                    log.exception("progress callback failed")
            if all(s.status == SampleStatus.FINISHED for s in job.samples):
                self._decode_and_finish(job)

    def _decode_and_finish(self, job: Job) -> None:
        self._finish(job, result=self.runner.result(job))

    def _finish(self, job: Job, result: EditResult | None = None, error: Exception | None = None) -> None:
        self._jobs.pop(job.request.request_id, None)
        self.scheduler.cancel(job.request.request_id)  # drops any samples still queued
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
