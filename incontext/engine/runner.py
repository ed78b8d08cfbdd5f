"""The engine's runner: what one step does with tensors, through each model's family adapter.

The loop (engine/local.py) decides which samples step; the runner
- loads models (`load`) and picks each one's adapter from its directory (engine/families);
- prepares a request's inputs the first time one of its samples runs: the prompt's
  conditioning and each image's latents (both cached; images by content), its sigma
  schedule, and each sample's starting latents;
- `execute`: one denoising forward over the batch's samples that compute this step (the
  others reuse their last velocity, engine/stepcache.py);
- `apply`: every sample's Euler update, the same for every family;
- `result`: decodes a finished request and reports where its latents moved.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from incontext import sampler, selector
from incontext.engine import families, preview
from incontext.engine.caches import LRU, image_key
from incontext.engine.compiled import CompiledModels
from incontext.engine.families import Batch, Family
from incontext.engine.invariance import make_batch_invariant
from incontext.engine.protocol import EditRequest, EditResult, ProgressCallback
from incontext.engine.scheduler import Sample, ScheduledBatch
from incontext.models.registry import ModelPreset

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """A request in flight: its samples' tensors live here, the scheduler sees only counters."""

    request: EditRequest
    future: Future
    on_progress: ProgressCallback | None
    model_id: str  # the preset's id, resolved once at admission
    steps: int
    draws: int = 1  # denoisings per output image (sampler.merge_draws): sample i·draws + j is image i's draw j
    timesteps: list[float] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # sample index → (1, N, 4C)
    velocities: dict[int, torch.Tensor] = field(default_factory=dict)  # sample index → last computed (1, N, 4C)
    compute_steps: frozenset[int] | None = None  # steps that run the transformer; None: all
    prompt: Any = None  # the family's text conditioning of the request's prompt
    reference: torch.Tensor | None = None  # the edited image's packed latents (1, N, 4C)
    context: tuple[torch.Tensor, ...] = ()  # every image's, the edited one first: what the family conditions on
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
    jobs: list[Job]
    conditioning: Batch  # the family's stacked prompts, references and guidance


@dataclass
class Step:
    """What `execute` hands to `apply`: every sample's latents and velocity, and which rows
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


class Runner:
    def __init__(self, *, dtype: str = "auto", device: str = "cpu", text_cache: int = 256, image_cache: int = 64,
                 reuse_output_latents: bool = True, compile_dir: Path | None = None):
        self.dtype = dtype
        self.device = device
        self.models: dict[str, Any] = {}  # model id → its loaded modules (sampler.Models, KleinModels, …)
        self.families: dict[str, Family] = {}  # model id → its adapter
        self.projections: dict[str, torch.Tensor] = {}  # model id → its latent-to-RGB preview map
        self.compile_dir = compile_dir
        self.compiled: dict[str, CompiledModels] = {}
        self.text_cache: LRU[tuple] = LRU(text_cache)
        self.latent_cache: LRU[torch.Tensor] = LRU(image_cache)
        self.reuse_output_latents = reuse_output_latents
        self.stats = EngineStats()
        self._inputs: _BatchInputs | None = None

    def load(self, preset: ModelPreset):
        family = self.families.get(preset.id) or families.for_directory(preset.directory)
        self.families[preset.id] = family
        if preset.id not in self.models:
            m = family.load(preset.directory, device=self.device, dtype=self.dtype, max_sequence_length=preset.max_sequence_length)
            make_batch_invariant(m.transformer)  # a request's image never depends on its batch (invariance.py)
            self.models[preset.id] = m
            self.projections[preset.id] = preview.fit_projection(m, encode=family.encode_images)
            if self.compile_dir is not None and family.compiles:
                self.compiled[preset.id] = CompiledModels(m, preset.directory, self.compile_dir)
        return self.models[preset.id]

    def mask(self, preset: ModelPreset, request: EditRequest) -> EditResult | None:
        """A mask request (EditRequest.thing_mask) answered by the model's selector without denoising;
        None where the model ships none (only a Kontext directory can) or the input is not a drawing."""
        started = time.perf_counter()
        with torch.no_grad():
            drawn = selector.draw(self.models[preset.id], request.prompt, request.image)
        if drawn is None:
            return None
        return EditResult(images=[drawn] * request.num_images, seeds=[request.seed + i for i in range(request.num_images)],
                          num_inference_steps=0, timings_ms={"total": (time.perf_counter() - started) * 1000}, selected=True)

    def _current(self, model_id: str):
        """The model to run now: its compiled twin once that is loaded, else the eager one."""
        if model_id in self.compiled:
            return self.compiled[model_id].current()
        return self.models[model_id]

    def idle(self) -> None:
        """Nothing to step: let the last batch's tensors go, and load a package just built."""
        self._inputs = None
        for compiled in self.compiled.values():
            compiled.current()

    def close(self) -> None:
        for compiled in self.compiled.values():
            compiled.close()

    # ------------------------------------------------------------ execute

    def _prepare(self, job: Job, m, family: Family) -> None:
        r, model_id = job.request, job.model_id
        images = [r.image, *r.references]
        image_keys = tuple(image_key(image) for image in images)
        key = (model_id, r.prompt, *(image_keys if family.prompt_sees_images else ()))
        prompt = self.text_cache.get(key)
        if prompt is None:
            prompt = family.encode_prompt(m, r.prompt, images)
            self.text_cache.put(key, prompt)
        job.prompt = prompt
        job.context = tuple(self._latents(model_id, image, k, m, family) for image, k in zip(images, image_keys))
        job.reference = job.context[0]
        # The schedule's shift follows the target's token count, as the stock pipelines do.
        job.timesteps, job.sigmas = family.schedule(m, job.steps, job.reference.shape[1])

    def _latents(self, model_id: str, image, content_key: str, m, family: Family) -> torch.Tensor:
        """One image's packed latents (1, N, 4C), cached by the image's content."""
        key = (model_id, content_key)
        latents = self.latent_cache.get(key)
        if latents is None:
            latents = family.encode_images(m, [image])
            self.latent_cache.put(key, latents)
        return latents

    @torch.no_grad()
    def execute(self, batch: ScheduledBatch, jobs: dict[str, Job]) -> Step:
        """Every sample's velocity for this step: one transformer pass over the samples whose
        schedule computes this step; the others reuse their last velocity."""
        model_id, width, height, _ = batch.bucket
        family, m = self.families[model_id], self._current(model_id)
        now = time.perf_counter()
        for s in batch.new:
            job = jobs[s.request_id]
            if job.reference is None:  # the request's first sample to run
                self._prepare(job, m, family)
                job.first_step = now
            image, draw = divmod(s.index, job.draws)
            seed = sampler.draw_seeds(job.request.seed + image, job.draws)[draw]
            job.latents[s.index] = family.initial_latents(m, seed, job.reference, height, width)
        inputs = self._batch_inputs(batch, jobs, m, family)
        samples, batch_jobs = batch.samples, inputs.jobs
        img = torch.cat([j.latents[s.index] for j, s in zip(batch_jobs, samples)])
        computed = [j.computes(s.step) for j, s in zip(batch_jobs, samples)]
        rows = [i for i, c in enumerate(computed) if c]
        self.stats.steps += 1
        self.stats.reused_evals += len(samples) - len(rows)
        if not rows:
            return Step(img, torch.cat([j.velocities[s.index] for j, s in zip(batch_jobs, samples)]), computed)
        conditioning, rows_img = inputs.conditioning, img
        if len(rows) < len(samples):
            index = torch.tensor(rows)
            conditioning, rows_img = conditioning.rows(index), img.index_select(0, index)
        t0 = time.perf_counter()
        v = family.velocity(m, conditioning, rows_img, torch.tensor([batch_jobs[i].timesteps[samples[i].step] for i in rows]))
        self.stats.transformer_seconds += time.perf_counter() - t0
        self.stats.transformer_passes += 1
        self.stats.transformer_evals += len(rows)
        self.stats.batch_sizes.append(len(rows))
        if len(rows) < len(samples):
            fresh = dict(zip(rows, v.split(1)))
            v = torch.cat([fresh[i] if i in fresh else j.velocities[s.index] for i, (j, s) in enumerate(zip(batch_jobs, samples))])
        return Step(img, v, computed, compiled=m is not self.models[model_id])

    def _batch_inputs(self, batch: ScheduledBatch, jobs: dict[str, Job], m, family: Family) -> _BatchInputs:
        """The stacked inputs of the running batch, rebuilt only when its samples change."""
        samples = tuple(batch.samples)
        if self._inputs is not None and self._inputs.samples == samples:  # Sample compares by identity
            return self._inputs
        _, width, height, _ = batch.bucket
        batch_jobs = [jobs[s.request_id] for s in samples]
        conditioning = family.batch(m, [j.prompt for j in batch_jobs], [j.context for j in batch_jobs],
                                    [float(j.request.guidance_scale) for j in batch_jobs], height, width,
                                    true_cfg=[j.request.true_cfg for j in batch_jobs])
        self._inputs = _BatchInputs(samples=samples, jobs=batch_jobs, conditioning=conditioning)
        return self._inputs

    def apply(self, batch: ScheduledBatch, step: Step, jobs: dict[str, Job]) -> None:
        """Every sample's Euler update with its own σ → σ_next."""
        batch_jobs = [jobs[s.request_id] for s in batch.samples]
        sig = torch.tensor([j.sigmas[s.step] for j, s in zip(batch_jobs, batch.samples)])
        sig_next = torch.tensor([j.sigmas[s.step + 1] for j, s in zip(batch_jobs, batch.samples)])
        out = sampler.euler_step(step.img, step.velocities, sig, sig_next)
        for row, (j, s) in enumerate(zip(batch_jobs, batch.samples)):
            j.latents[s.index] = out[row : row + 1]
            if step.computed[row]:
                j.velocities[s.index] = step.velocities[row : row + 1]
                j.evals += 1 if s.index == 0 else 0
                j.compiled_evals += 1 if s.index == 0 and step.compiled else 0

    # ------------------------------------------------------------ results

    def preview(self, job: Job):
        """The first image as this step predicts it will end: x0 = x_t − σ·v for a rectified
        flow, through the model's fixed latent-to-RGB map (a small matmul, no VAE)."""
        sample = job.samples[0]
        if sample.index not in job.velocities:
            return None
        r = job.request
        x0 = job.latents[sample.index].float() - job.sigmas[sample.step] * job.velocities[sample.index].float()
        return preview.render(x0, r.height, r.width, self.models[job.model_id].vae_scale_factor, self.projections[job.model_id])

    def result(self, job: Job) -> EditResult:
        """A finished request's images, decoded, with where each one's latents moved."""
        r = job.request
        family, m = self.families[job.model_id], self._current(job.model_id)
        with torch.no_grad():
            lat = sampler.merge_draws(torch.cat([job.latents[i] for i in range(r.num_images * job.draws)]), job.draws)
            images = family.decode(m, lat, r.height, r.width)
            change_maps = list(sampler.change_map(lat, job.reference, r.height, r.width, m.vae_scale_factor))
            rendered = family.decode(m, job.reference, r.height, r.width)[0] if r.render_context else None
        if self.reuse_output_latents:
            for i, img in enumerate(images):
                self.latent_cache.put((job.model_id, image_key(img)), lat[i : i + 1])
        return EditResult(
            images=images, seeds=[r.seed + i for i in range(r.num_images)], num_inference_steps=job.steps,
            transformer_evals=job.evals * job.draws, change_maps=change_maps, rendered_context=rendered,
            timings_ms={"total": (time.perf_counter() - job.started) * 1000, "queued": (job.first_step - job.started) * 1000,
                        # not a time: the share of its transformer passes that ran compiled
                        "compiled_share": job.compiled_evals / job.evals if job.evals else 0.0},
        )
