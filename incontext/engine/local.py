"""The in-process engine: one thread runs denoising steps for every request at once.

One engine step is three calls with plain data between them:
    batch = scheduler.schedule()   # which samples run (pure bookkeeping)
    step = execute(batch)          # prepare new samples' inputs, one transformer pass
    _apply(batch, step)            # the Euler update of every sample
    finished = scheduler.update(batch)  # advance counters; finished samples are decoded
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from incontext import sampler
from incontext.engine import preview, stepcache
from incontext.engine.caches import LRU, image_key
from incontext.engine.compiled import CompiledModels
from incontext.engine.protocol import EditRequest, EditResult, ProgressCallback, StepProgress
from incontext.engine.scheduler import SampleStatus, Sample, ScheduledBatch, Scheduler
from incontext.engine.stepcache import StepCacheConfig
from incontext.errors import Cancelled, IncontextError, InvalidInput, ModelError
from incontext.models.loader import load_model
from incontext.models.registry import Registry

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    """A request in flight: its samples' tensors live here, the scheduler sees only counters."""

    request: EditRequest
    future: Future
    on_progress: ProgressCallback | None
    steps: int
    timesteps: list[float] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # sample index → (1, N, 4C)
    velocities: dict[int, torch.Tensor] = field(default_factory=dict)  # sample index → last computed (1, N, 4C)
    compute_steps: frozenset[int] | None = None  # steps that run the transformer; None: all
    txt: torch.Tensor | None = None
    vec: torch.Tensor | None = None
    img_cond: torch.Tensor | None = None
    started: float = 0.0  # when submitted
    first_step: float = 0.0
    evals: int = 0  # transformer passes per image
    compiled_evals: int = 0  # of which by the compiled transformer

    def computes(self, step: int) -> bool:
        return self.compute_steps is None or step in self.compute_steps


@dataclass(eq=False)
class _BatchInputs:
    """The running batch's unchanging inputs, stacked once and reused every step until a
    sample joins or leaves (rows in the order of `samples`)."""

    samples: tuple[Sample, ...]
    jobs: list[_Job]
    img_cond: torch.Tensor  # (B, N, 4C)
    txt: torch.Tensor  # (B, L, D)
    vec: torch.Tensor  # (B, P)
    guidance: torch.Tensor  # (B,)
    img_ids: torch.Tensor
    txt_ids: torch.Tensor


@dataclass
class _Step:
    """What `execute` hands to `_apply`: every sample's latents and velocity, and which rows
    the transformer computed (the others reused their last velocity)."""

    img: torch.Tensor  # (B, N, 4C)
    velocities: torch.Tensor  # (B, N, 4C)
    computed: list[bool]
    compiled: bool = False  # the computed rows ran the compiled transformer


@dataclass
class EngineStats:
    steps: int = 0  # engine steps (a step where every sample reuses its velocity runs no transformer)
    transformer_passes: int = 0  # batched forward calls
    transformer_evals: int = 0  # sample-passes
    reused_evals: int = 0  # sample-steps that reused a velocity (step cache)
    transformer_seconds: float = 0.0  # wall time inside the forward calls
    busy_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # per forward call


def _rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t.index_select(0, index)


class LocalEngine:
    def __init__(self, registry: Registry, *, max_batch_size: int = 8, dtype: str = "auto", device: str = "cpu",
                 text_cache: int = 256, image_cache: int = 64, reuse_output_latents: bool = True,
                 step_cache: StepCacheConfig | str | None = None, compile_dir: Path | None = None):
        """`step_cache`: None for the exact sampler, a preset name ("fast") or a StepCacheConfig,
        for every model; `set_step_cache` changes it, also for one model only. `compile_dir`:
        where each loaded model's ahead-of-time compiled transformer is kept (engine/compiled.py);
        it is loaded from there, or built there at the lowest priority while the engine serves
        eagerly. None: eager only."""
        self.registry = registry
        self.dtype = dtype
        self.device = device
        self.scheduler = Scheduler(max_batch_size)
        self.models: dict[str, sampler.Models] = {}
        self.projections: dict[str, torch.Tensor] = {}  # model id → its latent-to-RGB preview map
        self.compile_dir = compile_dir
        self.compiled: dict[str, CompiledModels] = {}
        self.text_cache: LRU[tuple] = LRU(text_cache)
        self.latent_cache: LRU[torch.Tensor] = LRU(image_cache)
        self.reuse_output_latents = reuse_output_latents
        self.stats = EngineStats()
        self.step_cache = stepcache.resolve(step_cache)
        self._model_step_cache: dict[str, StepCacheConfig | None] = {}
        self._inputs: _BatchInputs | None = None
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._jobs: dict[str, _Job] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
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

    def load(self, model_id: str) -> sampler.Models:
        preset = self.registry.resolve(model_id)
        if preset.id not in self.models:
            self.models[preset.id] = load_model(preset.directory, device=self.device, dtype=self.dtype, max_sequence_length=preset.max_sequence_length)
            self.projections[preset.id] = preview.fit_projection(self.models[preset.id])
            if self.compile_dir is not None:
                self.compiled[preset.id] = CompiledModels(self.models[preset.id], preset.directory, self.compile_dir)
        return self.models[preset.id]

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
        preset_id = self.registry.resolve(model_id).id
        return self._model_step_cache.get(preset_id, self.step_cache)

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=not self.scheduler.has_work())
            if self._stop.is_set():
                break
            batch = self.scheduler.schedule()
            if not batch.samples:
                self._inputs = None  # let the last batch's tensors go
                for compiled in self.compiled.values():  # load a package just built while nothing waits
                    compiled.current()
                continue
            t0 = time.perf_counter()
            try:
                step = self.execute(batch)
            except Exception as e:  # a broken request must not take the engine down
                log.exception("engine step failed")
                for job in {self._jobs[s.request_id] for s in batch.samples if s.request_id in self._jobs}:
                    self._finish(job, error=e if isinstance(e, IncontextError) else IncontextError(f"inference failed: {e}"))
                continue
            self._apply(batch, step)
            finished = self.scheduler.update(batch)
            self.stats.busy_seconds += time.perf_counter() - t0
            self._after_update(batch, finished)
        for compiled in self.compiled.values():
            compiled.close()

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
            m = self.load(request.model_id)
            preset = self.registry.resolve(request.model_id)
            steps = request.num_inference_steps or preset.num_inference_steps
            mult = m.vae_scale_factor * 2
            if request.width % mult or request.height % mult:
                raise InvalidInput(f"output size {request.width}×{request.height} must be a multiple of {mult}")
            if request.image.size != (request.width, request.height):
                raise InvalidInput("the context image must already be at the output size")
        except IncontextError as e:
            fut.set_exception(e)
            return
        except Exception as e:  # a model that fails to load must fail its request, not the engine thread
            log.exception("could not admit request %s", request.request_id)
            fut.set_exception(ModelError(f"could not load model {request.model_id!r}: {e.__class__.__name__}: {e}"))
            return
        bucket = (preset.id, request.width, request.height)
        job = _Job(request, fut, on_progress, steps, started=submitted)
        cache = self.step_cache_for(preset.id)
        if cache is not None and cache.evals(steps) < steps:
            job.compute_steps = cache.compute_steps(steps)
        job.samples = [Sample(request.request_id, i, bucket, steps, owner=request.owner) for i in range(request.num_images)]
        self._jobs[request.request_id] = job
        self.scheduler.add(job.samples)

    def _cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)
        job = self._jobs.get(request_id)
        if job is not None:
            self._finish(job, error=Cancelled(f"request {request_id} was cancelled"))

    # ------------------------------------------------------------ execute

    def _prepare(self, job: _Job, m: sampler.Models, model_id: str) -> None:
        r = job.request
        key = (model_id, r.prompt)
        enc = self.text_cache.get(key)
        if enc is None:
            enc = sampler.encode_text(m, [r.prompt])
            self.text_cache.put(key, enc)
        job.txt, job.vec = enc
        ikey = (model_id, image_key(r.image))
        cond = self.latent_cache.get(ikey)
        if cond is None:
            cond = sampler.encode_images(m, [r.image])
            self.latent_cache.put(ikey, cond)
        job.img_cond = cond
        seq = cond.shape[1]
        job.timesteps, job.sigmas = sampler.schedule(job.steps, seq, m.scheduler_config)

    @torch.no_grad()
    def execute(self, batch: ScheduledBatch) -> _Step:
        """Every sample's velocity for this step: one transformer pass over the samples whose
        schedule computes this step; the others reuse their last velocity."""
        model_id, width, height = batch.bucket
        m = self.models[model_id]
        if model_id in self.compiled:
            m = self.compiled[model_id].current()
        now = time.perf_counter()
        for s in batch.new:
            job = self._jobs[s.request_id]
            if job.txt is None:  # the request's first sample to run
                self._prepare(job, m, model_id)
                job.first_step = now
            job.latents[s.index] = sampler.initial_latents(m, job.request.seed + s.index, job.img_cond, height, width)
        inputs = self._batch_inputs(batch, m)
        samples, jobs = batch.samples, inputs.jobs
        img = torch.cat([j.latents[s.index] for j, s in zip(jobs, samples)])
        computed = [j.computes(s.step) for j, s in zip(jobs, samples)]
        rows = [i for i, c in enumerate(computed) if c]
        self.stats.steps += 1
        self.stats.reused_evals += len(samples) - len(rows)
        if not rows:
            return _Step(img, torch.cat([j.velocities[s.index] for j, s in zip(jobs, samples)]), computed)
        index = None if len(rows) == len(samples) else torch.tensor(rows)
        t0 = time.perf_counter()
        v = sampler.predict_velocity(
            m,
            img=_rows(img, index),
            img_cond=_rows(inputs.img_cond, index),
            txt=_rows(inputs.txt, index),
            vec=_rows(inputs.vec, index),
            timesteps=torch.tensor([jobs[i].timesteps[samples[i].step] for i in rows]),
            guidance=_rows(inputs.guidance, index),
            img_ids=inputs.img_ids,
            txt_ids=inputs.txt_ids,
        )
        self.stats.transformer_seconds += time.perf_counter() - t0
        self.stats.transformer_passes += 1
        self.stats.transformer_evals += len(rows)
        self.stats.batch_sizes.append(len(rows))
        if index is not None:
            fresh = dict(zip(rows, v.split(1)))
            v = torch.cat([fresh[i] if i in fresh else j.velocities[s.index] for i, (j, s) in enumerate(zip(jobs, samples))])
        return _Step(img, v, computed, compiled=m is not self.models[model_id])

    def _batch_inputs(self, batch: ScheduledBatch, m: sampler.Models) -> _BatchInputs:
        """The stacked inputs of the running batch, rebuilt only when its samples change."""
        samples = tuple(batch.samples)
        if self._inputs is not None and self._inputs.samples == samples:  # Sample compares by identity
            return self._inputs
        model_id, width, height = batch.bucket
        jobs = [self._jobs[s.request_id] for s in samples]
        ids_key = (width, height, m.vae_scale_factor, jobs[0].txt.shape[1])
        if ids_key not in self._ids:
            self._ids[ids_key] = sampler.kontext_ids(height, width, m.vae_scale_factor, ids_key[3])
        img_ids, txt_ids = self._ids[ids_key]
        self._inputs = _BatchInputs(
            samples=samples,
            jobs=jobs,
            img_cond=torch.cat([j.img_cond for j in jobs]),
            txt=torch.cat([j.txt for j in jobs]),
            vec=torch.cat([j.vec for j in jobs]),
            guidance=torch.tensor([float(j.request.guidance_scale) for j in jobs]),
            img_ids=img_ids,
            txt_ids=txt_ids,
        )
        return self._inputs

    def _apply(self, batch: ScheduledBatch, step: _Step) -> None:
        jobs = [self._jobs[s.request_id] for s in batch.samples]
        sig = torch.tensor([j.sigmas[s.step] for j, s in zip(jobs, batch.samples)])
        sig_next = torch.tensor([j.sigmas[s.step + 1] for j, s in zip(jobs, batch.samples)])
        out = sampler.euler_step(step.img, step.velocities, sig, sig_next)
        for row, (j, s) in enumerate(zip(jobs, batch.samples)):
            j.latents[s.index] = out[row : row + 1]
            if step.computed[row]:
                j.velocities[s.index] = step.velocities[row : row + 1]
                j.evals += 1 if s.index == 0 else 0
                j.compiled_evals += 1 if s.index == 0 and step.compiled else 0

    def _after_update(self, batch: ScheduledBatch, finished: list[Sample]) -> None:
        for job in {id(self._jobs[s.request_id]): self._jobs[s.request_id] for s in batch.samples if s.request_id in self._jobs}.values():
            if job.on_progress is not None:
                done = min(s.step for s in job.samples)
                shown = self._preview(job) if preview.due(done, job.steps, job.request.previews) else None
                try:
                    job.on_progress(StepProgress(done, job.steps, shown))
                except Exception:  # a client's callback must not stop the engine
                    log.exception("progress callback failed")
            if all(s.status == SampleStatus.FINISHED for s in job.samples):
                self._decode_and_finish(job)

    def _preview(self, job: _Job):
        """The first image as this step predicts it will end: x0 = x_t − σ·v for a rectified
        flow, through the model's fixed latent-to-RGB map (a small matmul, no VAE)."""
        sample = job.samples[0]
        if sample.index not in job.velocities:
            return None
        r = job.request
        model_id = sample.bucket[0]
        x0 = job.latents[sample.index].float() - job.sigmas[sample.step] * job.velocities[sample.index].float()
        return preview.render(x0, r.height, r.width, self.models[model_id].vae_scale_factor, self.projections[model_id])

    def _decode_and_finish(self, job: _Job) -> None:
        r = job.request
        model_id = job.samples[0].bucket[0]
        m = self.models[model_id]
        if model_id in self.compiled:
            m = self.compiled[model_id].current()
        with torch.no_grad():
            lat = torch.cat([job.latents[i] for i in range(r.num_images)])
            images = sampler.decode(m, lat, r.height, r.width)
            change_maps = list(sampler.change_map(lat, job.img_cond, r.height, r.width, m.vae_scale_factor))
        if self.reuse_output_latents:
            for i, img in enumerate(images):
                self.latent_cache.put((model_id, image_key(img)), lat[i : i + 1])
        result = EditResult(
            images=images, seeds=[r.seed + i for i in range(r.num_images)], num_inference_steps=job.steps,
            transformer_evals=job.evals, change_maps=change_maps,
            timings_ms={"total": (time.perf_counter() - job.started) * 1000, "queued": (job.first_step - job.started) * 1000,
                        # not a time: the share of its transformer passes that ran compiled
                        "compiled_share": job.compiled_evals / job.evals if job.evals else 0.0},
        )
        self._finish(job, result=result)

    def _finish(self, job: _Job, result: EditResult | None = None, error: Exception | None = None) -> None:
        self._jobs.pop(job.request.request_id, None)
        self.scheduler.cancel(job.request.request_id)  # drops any samples still queued
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
