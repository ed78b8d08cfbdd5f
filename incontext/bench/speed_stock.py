"""The benchmark's reference row: stock diffusers `FluxKontextPipeline` on the same model
directory and edits, one request at a time, doing the work our engine does for each (the
model's starting latents and its draws), so `bench speed`'s ratios compare equal work."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from incontext.bench.speed import Job, Record, Row, dtype_name, closed_loop, warmup_job


def run_stock(directory: Path, dtype: torch.dtype, jobs: list[Job], steps: int, guidance: float, max_sequence_length: int,
              consensus: int = 1) -> Row:
    """Stock `FluxKontextPipeline`, one edit at a time. With `consensus` k > 1 (a model directory
    that declares it) each edit is k images of one call, one generator per draw seed, whose
    latents' median is decoded as the pipeline decodes: the engine's work and output."""
    from diffusers import FluxKontextPipeline

    from incontext import sampler

    pipe = FluxKontextPipeline.from_pretrained(directory, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    start_latents = _context_start(directory, dtype, max_sequence_length)

    def call(job: Job) -> Record:
        # A model whose flow starts at the context gets our starting latents (made before the
        # clock starts); one that starts from noise draws it from the seed, as stock does.
        seeds = sampler.draw_seeds(job.seed, consensus)
        latents = start_latents(job, seeds) if start_latents else None
        sent = time.perf_counter()
        out = pipe(
            image=job.image, prompt=job.prompt, height=job.height, width=job.width, max_area=job.width * job.height,
            _auto_resize=False, num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=max_sequence_length,
            num_images_per_prompt=consensus, generator=[torch.Generator().manual_seed(s) for s in seeds], latents=latents,
            output_type="pil" if consensus == 1 else "latent",
        ).images
        image = out[0] if consensus == 1 else _decode_like_stock(pipe, sampler.merge_draws(out, consensus), job.height, job.width)
        return Record(sent, time.perf_counter(), image=image, evals=steps * consensus)

    call(warmup_job(jobs[0]))
    records, wall = closed_loop(call, jobs, 1)
    return Row(f"stock diffusers {dtype_name(dtype)}", "stock", 1, records, wall, {"dtype": dtype_name(dtype)})


def _context_start(directory: Path, dtype: torch.dtype, max_sequence_length: int):
    """For a model directory that declares a flow from the context (sampler.FlowStart), a
    function (job, seeds) → its starting latents, one row per seed, as our sampler makes them;
    else None."""
    import json

    extra = Path(directory) / "incontext.json"
    if not extra.is_file() or json.loads(extra.read_text()).get("flow_start", "noise") != "context":
        return None
    from incontext import sampler
    from incontext.models.loader import load_model

    m = load_model(directory, dtype=dtype, max_sequence_length=max_sequence_length)

    def start(job: Job, seeds: list[int]) -> torch.Tensor:
        context = sampler.encode_images(m, [job.image])
        return torch.cat([sampler.initial_latents(m, seed, context, job.height, job.width) for seed in seeds])

    return start


def _decode_like_stock(pipe, latents: torch.Tensor, height: int, width: int) -> Image.Image:
    """Packed latents (1, N, 4C) → the image, as `FluxKontextPipeline.__call__` decodes them."""
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with torch.no_grad():
        image = pipe.vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
