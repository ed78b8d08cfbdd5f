"""The speed benchmark: stock diffusers beside our engine, in-process and over HTTP, on the
same held-out edits.

    incontext bench speed                                       # the bundled nano model
    incontext bench speed --model ./my-model --n 8 --concurrency 1,4 --skip-stock --out results/quick

Every configuration edits the same `n` held-out world images (`bench.heldout`, one family
after another) with the same prompts, seeds (seed + i), steps and guidance, after one
warm-up edit of its own that is not timed:
1. the CPU's matmul peak: a 2048² product in fp32 and in bf16, best of a few runs;
2. stock diffusers `FluxKontextPipeline`, one request at a time, in fp32 and in bf16;
   the faster is the reference every ratio is taken to;
3. our engine in this process, one request at a time and with `max(concurrency)` requests
   in flight (closed loop: a client sends its next request when its last one is done);
   achieved FLOP/s is the transformer FLOPs of every pass (from the model config: linear
   layers and attention) over the engine's time inside the forward calls;
4. the same with the step cache (`engine/stepcache.py`, preset "fast"): evaluations per
   image, PSNR of its outputs to the exact ones, and the PSNR to the held-out targets of
   both (the loss is their difference);
5. the real server (`bench/speed_http.py`: `incontext serve` in a subprocess on a free loopback port, fresh data
   dir, one key) at each concurrency. A run's end-to-end latency is from sending its POST
   to its completion on the server (`completed_at`: same machine, same clock) plus one GET
   round trip to read it (at most until the client saw it), so it does not depend on how
   often the client polls; the latency
   a polling client actually observed is reported beside it. HTTP overhead = end-to-end
   latency − the engine's own time for the run (`output.timings_ms.total`, measured from
   the engine's submit to its result). Start-up = process start → first run accepted (201).

Writes report.md, results.json and speed.png (images/s per configuration) under `out_dir`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from incontext import imageio
from incontext.bench import checks, heldout
from incontext.bench.hardware import MATMUL_SIZE, machine, matmul_peak, transformer_flops
from incontext.bench.speed_report import goals, write_report
from incontext.errors import InvalidInput
from incontext.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("results/speed")
DEFAULT_CONCURRENCY = (1, 4, 8, 16)
SERVER_START_TIMEOUT_S = 600  # a loaded 2-core machine can take minutes to import torch
POLL_FIRST_S = 0.05  # HTTP clients poll after 50 ms, then back off by 1.5× …
POLL_MAX_S = 0.5  # … to every half second
SERVER_SPLIT = ("dispatch_input", "engine_call", "dispatch_output")  # the dispatcher's timings_ms

OnStage = Callable[[str], None]


@dataclass
class Job:
    """One benchmark edit: the held-out example at the model's output size."""

    prompt: str
    image: Image.Image  # context, at (width, height)
    target: Image.Image  # ground truth, at (width, height)
    width: int
    height: int
    seed: int


@dataclass
class Record:
    """One timed request; times are time.perf_counter() seconds."""

    sent: float
    done: float
    image: Image.Image | None = None
    evals: int | None = None
    engine_ms: float | None = None  # HTTP: the engine's own time for the run
    observed: float | None = None  # HTTP: when a polling client saw the result
    timings_ms: dict = field(default_factory=dict)  # HTTP: the POST round trip and the server's own split

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass
class Row:
    name: str
    kind: str  # "stock", "engine", "http"
    concurrency: int
    records: list[Record] = field(default_factory=list)
    wall: float = 0.0
    extra: dict = field(default_factory=dict)
    step_cache: bool = False  # sampled with the step cache (the fast preset)


# ---------------------------------------------------------------- the model's arithmetic


def job_flops(models, job: Job) -> float:
    n = (job.height // (models.vae_scale_factor * 2)) * (job.width // (models.vae_scale_factor * 2))
    return transformer_flops(models.transformer.config, 2 * n, models.max_sequence_length)


# ---------------------------------------------------------------- the edits


def make_jobs(n: int, preset, seed: int = 0) -> list[Job]:
    """`n` held-out examples, one family after another, at the sizes the server would pick."""
    families = heldout.families()
    per_family = math.ceil(n / len(families))
    examples = heldout.heldout_set(per_family)
    ordered = [examples[f][k] for k in range(per_family) for f in families][:n]
    jobs = []
    for i, ex in enumerate(ordered):
        w, h = imageio.output_size(ex.context.width, ex.context.height, target_area=preset.target_area, multiple=preset.multiple)
        jobs.append(Job(ex.instruction, imageio.fit_to_size(ex.context, w, h), imageio.fit_to_size(ex.target, w, h), w, h, seed + i))
    return jobs


def warmup_job(job: Job) -> Job:
    """An edit unlike every timed one, so it leaves nothing in the engine's caches they could hit."""
    return Job("warm up", Image.new("RGB", (job.width, job.height), (128, 128, 128)), job.target, job.width, job.height, 10**6)


def in_own_thread(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) on a thread that ends with it; its result, or its exception.

    The benchmark's torch work runs this way, one piece at a time, never on the main thread:
    with libgomp, a live thread that has run parallel torch work makes every other thread's
    ops several times slower on a small machine (LocalEngine.start_thread), so each
    configuration must run with no other such thread alive — as a user's script would."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="incontext-bench")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def closed_loop(call: Callable[[Job], Record], jobs: list[Job], concurrency: int) -> tuple[list[Record], float]:
    """Run every job with `concurrency` clients, each sending its next job when its last one is
    done. Returns the records in job order and the wall time (first sent → last done)."""
    records: list[Record | None] = [None] * len(jobs)
    counter = itertools.count()
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= len(jobs):
                return
            records[i] = call(jobs[i])

    if concurrency == 1:  # in the calling thread: stock diffusers runs where it was loaded (see in_own_thread)
        client()
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(client) for _ in range(concurrency)]:
                f.result()
    done = [r for r in records if r is not None]
    return done, max(r.done for r in done) - min(r.sent for r in done)


# ---------------------------------------------------------------- our engine, in this process


def run_engine(registry, models, jobs: list[Job], *, model_id: str, steps: int, guidance: float, concurrency: int,
               max_batch_size: int, step_cache=None, compiled=None, name: str) -> Row:
    """`compiled`: a warm `CompiledModels` of `models` (engine/compiled.py), or None for eager."""
    from incontext.engine.local import LocalEngine
    from incontext.engine.protocol import EditRequest

    engine = LocalEngine(registry, dtype=models.dtype, max_batch_size=max_batch_size, step_cache=step_cache)
    engine.models[model_id] = models  # share the loaded weights between configurations
    if compiled is not None:
        engine.compiled[model_id] = compiled
    engine.start_thread()
    ids = itertools.count()

    def call(job: Job) -> Record:
        request = EditRequest(f"{name}-{next(ids)}", model_id, job.prompt, job.image, job.width, job.height, job.seed,
                              guidance_scale=guidance, num_inference_steps=steps)
        sent = time.perf_counter()
        result = engine.submit(request).result()
        return Record(sent, time.perf_counter(), image=result.images[0], evals=result.transformer_evals)

    try:
        call(warmup_job(jobs[0]))
        before = _snapshot(engine.stats)
        records, wall = closed_loop(call, jobs, concurrency)
        after = _snapshot(engine.stats)
    finally:
        asyncio.run(engine.close())
    flops = sum(job_flops(models, job) * r.evals for job, r in zip(jobs, records))
    seconds = after["transformer_seconds"] - before["transformer_seconds"]
    sizes = after["batch_sizes"][len(before["batch_sizes"]):]
    extra = {"transformer_gflops_per_second": flops / seconds / 1e9 if seconds > 0 else None,
             "mean_batch_size": float(np.mean(sizes)) if sizes else None,
             "transformer_seconds": seconds, "dtype": dtype_name(models.dtype)}
    return Row(name, "engine", concurrency, records, wall, extra, step_cache=step_cache is not None)


def _snapshot(stats) -> dict:
    return {"transformer_seconds": stats.transformer_seconds, "batch_sizes": list(stats.batch_sizes)}


# ---------------------------------------------------------------- scoring


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def psnr_of(images: list[Image.Image], references: list[Image.Image]) -> float:
    """dB of the mean squared error over all pairs (as the quality benchmark does)."""
    return checks.db(float(np.mean([checks.mse(a, b) for a, b in zip(images, references)])))


def max_pixel_diff(images: list[Image.Image], references: list[Image.Image]) -> int:
    return int(max(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() for a, b in zip(images, references)))


def summarize(row: Row, reference: dict | None, peak: float | None, steps: int) -> dict:
    latencies = [r.latency * 1000 for r in row.records]
    out = {
        "name": row.name,
        "kind": row.kind,
        "concurrency": row.concurrency,
        "step_cache": row.step_cache,
        "n": len(row.records),
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p95_ms": percentile(latencies, 95),
        "images_per_second": len(row.records) / row.wall if row.wall > 0 else math.nan,
        "wall_seconds": row.wall,
        "transformer_evals_per_image": float(np.mean([r.evals for r in row.records])) if row.records[0].evals is not None else float(steps),
        **row.extra,
    }
    gflops = out.get("transformer_gflops_per_second")
    out["fraction_of_peak"] = gflops / peak if gflops and peak else None
    if row.kind == "http":
        out["http_overhead_p50_ms"] = percentile([r.latency * 1000 - r.engine_ms for r in row.records], 50)
        out["observed_latency_p50_ms"] = percentile([(r.observed - r.sent) * 1000 for r in row.records], 50)
        # Where the overhead goes: the POST round trip, the dispatcher before and after the
        # engine, and the hop to the engine process (engine_call − the engine's own total).
        split = {key: percentile([r.timings_ms[key] for r in row.records if key in r.timings_ms], 50) for key in ("post", *SERVER_SPLIT)}
        split["engine_hop"] = percentile([r.timings_ms["engine_call"] - r.engine_ms for r in row.records if "engine_call" in r.timings_ms], 50)
        out["overhead_split_p50_ms"] = split
    if reference:
        out["throughput_vs_stock"] = out["images_per_second"] / reference["images_per_second"]
        out["latency_speedup_vs_stock"] = reference["latency_p50_ms"] / out["latency_p50_ms"]
    return out


# ---------------------------------------------------------------- the benchmark


def run_speed(
    model_id_or_dir: str | None = None,
    n: int = 32,
    out_dir: Path = DEFAULT_OUT,
    *,
    steps: int | None = None,
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY,
    skip_stock: bool = False,
    skip_http: bool = False,
    step_cache: str = "fast",
    threads: int | None = None,
    compile: bool = True,
    compile_dir: Path | None = None,
    cold_seconds: float | None = None,
    matmul_size: int = MATMUL_SIZE,
    seed: int = 0,
    on_stage: OnStage | None = None,
) -> dict:
    """Measure every configuration; write report.md, results.json and speed.png under
    `out_dir`; return the results (as in results.json). `compile_dir`: where the compiled
    transformer is kept (default: the one `serve` uses); `cold_seconds`: the window of the
    cold-start row (default: a minute; 0 skips it)."""
    from incontext.engine import stepcache
    from incontext.models.loader import load_model
    from incontext.models.registry import DEFAULT_MODEL_ID, Registry, default_registry, preset_for_directory

    on_stage = on_stage or (lambda stage: log.info("bench speed: %s", stage))
    concurrency = sorted(set(concurrency))
    if n < 1 or not concurrency or concurrency[0] < 1:
        raise InvalidInput(f"need n ≥ 1 and concurrency levels ≥ 1 (got n={n}, concurrency={concurrency})")
    cache_config = stepcache.resolve(step_cache)
    if cache_config is None:
        raise InvalidInput("the fast preset needs a step cache: give a preset name or every,first,last")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved_threads = torch.get_num_threads()
    threads = threads or saved_threads
    torch.set_num_threads(threads)
    try:
        # 1. the model and the edits
        if model_id_or_dir and (Path(model_id_or_dir) / "model_index.json").is_file():
            preset = preset_for_directory(Path(model_id_or_dir))
        else:
            preset = default_registry().resolve(model_id_or_dir)
        registry = Registry(default_id=preset.id)
        registry.add(preset)
        steps = steps or preset.num_inference_steps
        guidance = preset.guidance_scale
        models = in_own_thread(load_model, preset.directory, dtype="auto", max_sequence_length=preset.max_sequence_length)
        jobs = make_jobs(n, preset, seed)
        max_c = max(concurrency)

        # 2. the machine
        on_stage("matmul peak")
        peak = {name: in_own_thread(matmul_peak, dtype, matmul_size) for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
        engine_peak = peak.get(dtype_name(models.dtype))

        # 3. stock diffusers
        rows: list[Row] = []
        if not skip_stock:
            from incontext.bench.speed_stock import run_stock  # it imports this module's types

            for dtype in (torch.float32, torch.bfloat16):
                on_stage(f"stock diffusers, {dtype_name(dtype)}")
                rows.append(in_own_thread(run_stock, preset.directory, dtype, jobs, steps, guidance, preset.max_sequence_length,
                                          preset.consensus))

        # 4. the engine in this process, exact and with the step cache; compiled as the server
        #    does by default (engine/compiled.py), with the eager engine beside it
        compiled, compile_info = None, None
        compile_dir = compile_dir or Settings().resolved_compile_dir  # the package `serve` and `warmup` use
        if compile:
            compiled, compile_info = in_own_thread(_compiled_models, models, preset.directory, compile_dir, on_stage)
        levels = (1, max_c) if max_c > 1 else (1,)
        engine_runs = [(c, cache, compiled, f"engine {label}×{c}") for cache, label in ((None, ""), (cache_config, "fast ")) for c in levels]
        if compiled is not None:
            engine_runs += [(c, None, None, f"engine eager ×{c}") for c in levels]
        # The batch a server allows (its engine_max_batch_size), or room for every request in
        # flight: a model's draws are samples too, so a batch of one would run them one by one.
        max_batch = max(max_c, Settings().engine_max_batch_size)
        for c, cache, comp, name in engine_runs:
            on_stage(name)
            rows.append(run_engine(registry, models, jobs, model_id=preset.id, steps=steps, guidance=guidance,
                                   concurrency=c, max_batch_size=max_batch, step_cache=cache, compiled=comp, name=name))

        # 5. the server
        server = None
        if not skip_http:
            from incontext.bench.speed_http import run_http  # it imports this module's types

            # The server serves the directory as its default model.
            http_rows, server = run_http(preset.directory, jobs, model_id=DEFAULT_MODEL_ID,
                                         steps=steps, guidance=guidance, concurrency=concurrency, threads=threads,
                                         log_path=out_dir / "server.log", on_stage=on_stage,
                                         compile_dir=compile_dir if compiled is not None else None, fast_step_cache=step_cache,
                                         **({} if cold_seconds is None else {"cold_seconds": cold_seconds}))
            rows += http_rows

        # 6. scores
        stock_rows = [r for r in rows if r.kind == "stock"]
        reference = None
        if stock_rows:
            best = max(stock_rows, key=lambda r: len(r.records) / r.wall)
            reference = summarize(best, None, None, steps)
        summaries = [summarize(r, reference, engine_peak if r.kind == "engine" else None, steps) for r in rows]
        images = {r.name: [record.image for record in r.records] for r in rows}
        exact, fast, targets = images["engine ×1"], images["engine fast ×1"], [j.target for j in jobs]
        exact_db, fast_db = psnr_of(exact, targets), psnr_of(fast, targets)
        exact_evals = next(s for s in summaries if s["name"] == "engine ×1")["transformer_evals_per_image"]
        fast_evals = next(s for s in summaries if s["name"] == "engine fast ×1")["transformer_evals_per_image"]
        quality = {
            "config": cache_config.label(),
            "evals_per_image": fast_evals,
            "exact_evals_per_image": exact_evals,  # the steps × the model's draws (consensus)
            "fewer_evals": exact_evals / fast_evals,
            "psnr_fast_to_exact_db": psnr_of(fast, exact),
            "psnr_exact_to_targets_db": exact_db,
            "psnr_fast_to_targets_db": fast_db,
            "psnr_loss_db": exact_db - fast_db,
        }
        for summary in summaries:
            # Parity: stock and HTTP should match the engine up to float rounding (rows with
            # the step cache: the engine with it).
            same_sampler = fast if summary["step_cache"] else exact
            summary["max_pixel_diff_to_engine_x1"] = max_pixel_diff(images[summary["name"]], same_sampler)
        results = {
            "model": preset.id,
            "directory": str(preset.directory),
            "steps": steps,
            "consensus": preset.consensus,
            "guidance": guidance,
            "n": n,
            "seed": seed,
            "threads": threads,
            "engine_dtype": dtype_name(models.dtype),
            "machine": machine(),
            "compile": compile_info,
            "concurrency": concurrency,
            "max_concurrency": max_c,
            "sizes": sorted({f"{j.width}x{j.height}" for j in jobs}),
            "matmul_size": matmul_size,
            "peak_gflops_per_second": peak,
            "transformer_gflops_per_image_pass": {f"{j.width}x{j.height}": job_flops(models, j) / 1e9 for j in jobs},
            "reference": reference["name"] if reference else None,
            "rows": summaries,
            "step_cache_quality": quality,
            "server": server,
        }
        results["goals"] = goals(results)
        write_report(results, out_dir)
        return results
    finally:
        torch.set_num_threads(saved_threads)


def _compiled_models(models, model_dir: Path, compile_dir: Path, on_stage: OnStage):
    """The engine's compiled transformer (engine/compiled.py), built here first if this
    machine has no package for it yet; (None, info) if that fails."""
    from incontext.engine.compiled import CompiledModels, build, package_path

    path = package_path(compile_dir, model_dir, models)
    info = {"package": path.name, "build_seconds": None, "load_seconds": None, "failed": None}
    if not path.exists():
        on_stage("compiling the transformer ahead of time")
        t0 = time.perf_counter()
        try:
            build(models, path)
        except Exception as e:  # the eager rows are still worth measuring
            info["failed"] = f"{e.__class__.__name__}: {e}"
            return None, info
        info["build_seconds"] = time.perf_counter() - t0
    compiled = CompiledModels(models, model_dir, compile_dir, build_missing=False)
    compiled.current()
    info["load_seconds"], info["failed"] = compiled.load_seconds, compiled.failed
    return (None if compiled.compiled is None else compiled), info


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
