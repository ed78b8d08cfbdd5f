"""Step-level batching against stock diffusers, for every model family the engine serves.

For one model directory: stock diffusers' pipeline edits `n` pictures one at a time (as a
script serving it would); our engine edits the same `n` alone (batch 1) and with
`concurrency` requests in flight; with the same seeds, steps and guidance, the outputs are
compared pixel for pixel (parity). `bench speed --families` runs it on each family's tiny
random directory (incontext.testing); `bench/gpucheck.py` on full-size transformers on a GPU.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from incontext.bench.speed import closed_loop, in_own_thread

PROMPTS = ("make the circle blue", "turn the background green", "add a red square", "make it night", "remove the circle",
           "make the circle larger", "paint it in pastel colours", "make the square yellow")


@dataclass(frozen=True)
class Edit:
    prompt: str
    image: Image.Image
    seed: int


@dataclass(frozen=True)
class FamilySpec:
    """One family: how to write its tiny directory and call its stock pipeline on an edit."""

    name: str
    tiny_dir: Callable[[Path], Path]
    stock: Callable[[Path, torch.dtype, str], Callable[[Edit, int, float], Image.Image]]  # (dir, dtype, device) → (edit, steps, guidance) → image
    guidance: float


def _kontext_stock(directory: Path, dtype: torch.dtype, device: str):
    import json

    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(directory, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    max_len = json.loads((directory / "incontext.json").read_text()).get("max_sequence_length", 512)

    def call(edit: Edit, steps: int, guidance: float) -> Image.Image:
        w, h = edit.image.size
        return pipe(image=edit.image, prompt=edit.prompt, height=h, width=w, max_area=w * h, _auto_resize=False, num_inference_steps=steps,
                    guidance_scale=guidance, max_sequence_length=max_len, generator=torch.Generator().manual_seed(edit.seed)).images[0]
    return call


def _klein_stock(directory: Path, dtype: torch.dtype, device: str):
    import json

    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(directory, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    extra = json.loads((directory / "incontext.json").read_text())

    def call(edit: Edit, steps: int, guidance: float) -> Image.Image:
        w, h = edit.image.size
        return pipe(image=edit.image, prompt=edit.prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(edit.seed), max_sequence_length=extra.get("max_sequence_length", 512),
                    text_encoder_out_layers=tuple(extra.get("text_encoder_out_layers", (9, 18, 27)))).images[0]
    return call


def _qwen_stock(directory: Path, dtype: torch.dtype, device: str):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as stock_module
    from diffusers import QwenImageEditPlusPipeline

    from incontext.engine.families import qwen
    from incontext.testing import qwen_vl_processor

    m = qwen.load(directory, device="cpu", dtype=torch.float32)  # only for its tokenizer and image processor
    processor = qwen_vl_processor(m.image_processor, m.tokenizer)
    pipe = QwenImageEditPlusPipeline.from_pretrained(directory, processor=processor, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(edit: Edit, steps: int, guidance: float) -> Image.Image:
        w, h = edit.image.size
        # Stock resizes its VAE image to ~1024² pixels whatever the output size; the engine
        # encodes it at the output's size (docs/engine.md), so stock is told the same.
        stock_module.VAE_IMAGE_SIZE = w * h
        return pipe(image=edit.image, prompt=edit.prompt, negative_prompt=qwen.NEGATIVE_PROMPT, true_cfg_scale=guidance, height=h, width=w,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(edit.seed)).images[0]
    return call


def _tiny(builder_name: str):
    def build(path: Path) -> Path:
        from incontext import testing

        return getattr(testing, builder_name)(path)
    return build


FAMILIES = {
    "kontext": FamilySpec("FLUX.1 Kontext", _tiny("tiny_model_dir"), _kontext_stock, guidance=2.5),
    "klein": FamilySpec("FLUX.2 [klein]", _tiny("tiny_klein_dir"), _klein_stock, guidance=4.0),
    "qwen": FamilySpec("Qwen-Image-Edit-Plus", _tiny("tiny_qwen_edit_dir"), _qwen_stock, guidance=4.0),
}


def make_edits(n: int, size: int, seed: int = 0) -> list[Edit]:
    """`n` distinct pictures (a circle and a square, placed by the seed) with varied prompts."""
    edits = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(150, 250, 3)))
        draw = ImageDraw.Draw(img)
        x, y = (int(v) for v in rng.integers(0, size // 2, 2))
        draw.ellipse((x, y, x + size // 3, y + size // 3), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw.rectangle((size - x - size // 4, y, size - x, y + size // 4), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        edits.append(Edit(PROMPTS[i % len(PROMPTS)], img, seed + i))
    return edits


def mean_pixel_diff(a: list[Image.Image], b: list[Image.Image]) -> float:
    return float(np.mean([np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)).mean() for x, y in zip(a, b)]))


def _engine(directory: Path, edits: list[Edit], *, steps: int, guidance: float, concurrency: int, dtype: torch.dtype, device: str):
    """Our engine on `directory`: one warm-up edit, then every edit alone, then all of them with
    `concurrency` in flight. Returns (batch-1 records, concurrent records, wall of the concurrent run)."""
    import asyncio

    from incontext.bench.speed import Job, Record
    from incontext.engine.local import LocalEngine
    from incontext.engine.protocol import EditRequest
    from incontext.models.registry import Registry, preset_for_directory

    registry = Registry(default_id="m")
    registry.add(preset_for_directory(directory, id="m"))
    engine = LocalEngine(registry, dtype=str(dtype).removeprefix("torch."), device=device, max_batch_size=concurrency)
    engine.start_thread()
    ids = itertools.count()

    def call(job: Job) -> Record:
        request = EditRequest(f"r{next(ids)}", "m", job.prompt, job.image, job.width, job.height, job.seed,
                              guidance_scale=guidance, num_inference_steps=steps)
        sent = time.perf_counter()
        result = engine.submit(request).result()
        return Record(sent, time.perf_counter(), image=result.images[0])

    jobs = [Job(e.prompt, e.image, e.image, e.image.width, e.image.height, e.seed) for e in edits]
    try:
        call(Job("warm up", Image.new("RGB", edits[0].image.size, (128, 128, 128)), edits[0].image, *edits[0].image.size, 10**6))
        alone, _ = closed_loop(call, jobs, 1)
        together, wall = closed_loop(call, jobs, concurrency)
    finally:
        asyncio.run(engine.close())
    return alone, together, wall


def measure(directory: Path, family: str, *, n: int = 8, concurrency: int = 8, steps: int = 4, size: int = 64,
            dtype: torch.dtype = torch.float32, device: str = "cpu", stock_n: int | None = None) -> dict:
    """One family's row: stock diffusers one at a time, our engine alone and with `concurrency`
    in flight, on the same `n` edits. `stock_n`: how many of them stock runs (its time per edit
    is flat, so a few suffice where it is slow); parity is over those."""
    spec = FAMILIES[family]
    edits = make_edits(n, size)
    stock_edits = edits[: stock_n or n]

    def stock_run():
        call = spec.stock(Path(directory), dtype, device)
        call(Edit("warm up", Image.new("RGB", (size, size), (128, 128, 128)), 10**6), steps, spec.guidance)
        images, start = [], time.perf_counter()
        for e in stock_edits:
            images.append(call(e, steps, spec.guidance))
        return images, time.perf_counter() - start

    stock_images, stock_s = in_own_thread(stock_run)
    _free(device)
    alone, together, wall = in_own_thread(_engine, Path(directory), edits, steps=steps, guidance=spec.guidance, concurrency=concurrency,
                                          dtype=dtype, device=device)
    _free(device)
    stock_ips = len(stock_edits) / stock_s
    engine_ips = len(together) / wall
    return {
        "family": spec.name, "size": f"{size}x{size}", "steps": steps, "n": n, "concurrency": concurrency, "dtype": str(dtype).removeprefix("torch."),
        "stock_s_per_image": stock_s / len(stock_edits), "stock_images_per_s": stock_ips,
        "engine_x1_p50_s": float(np.median([r.latency for r in alone])),
        "engine_concurrent_images_per_s": engine_ips, "throughput_over_stock": engine_ips / stock_ips,
        "mean_pixel_diff_to_stock": mean_pixel_diff([r.image for r in alone[: len(stock_images)]], stock_images),
        "mean_pixel_diff_concurrent_to_alone": mean_pixel_diff([r.image for r in together], [r.image for r in alone]),
    }


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def tiny_rows(work_dir: Path, *, n: int = 8, concurrency: int = 8, steps: int = 4, size: int = 64) -> list[dict]:
    """Every family's row on its tiny random directory, in fp32 on the CPU."""
    rows = []
    for key, spec in FAMILIES.items():
        directory = spec.tiny_dir(Path(work_dir) / key)
        rows.append(measure(directory, key, n=n, concurrency=concurrency, steps=steps, size=size))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| family | size, steps | stock s/image | engine ×1 p50 s | engine ×C images/s | × stock | pixel diff to stock (of 255) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['size']}, {r['steps']} | {r['stock_s_per_image']:.3f} | {r['engine_x1_p50_s']:.3f} | "
                     f"{r['engine_concurrent_images_per_s']:.2f} (C={r['concurrency']}) | {r['throughput_over_stock']:.2f} | "
                     f"{r['mean_pixel_diff_to_stock']:.2f} |")
    return "\n".join(lines)
