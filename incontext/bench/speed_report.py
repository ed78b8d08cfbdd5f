"""The speed benchmark's outputs: the goals check, report.md, results.json and speed.png.

Tables are built once as (headers, rows of strings), so the markdown report and the CLI's
rich tables show the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from incontext.bench.report import jsonable, markdown_table

# Goals of the issue, shown next to the measurements.
GOAL_SINGLE_SPEEDUP = 2.0
GOAL_THROUGHPUT_16 = 5.0
GOAL_FEWER_EVALS = 1.8
GOAL_PSNR_LOSS_DB = 0.5
GOAL_PEAK_FRACTION = 0.4
GOAL_HTTP_OVERHEAD_MS = 5.0
GOAL_START_S = 3.0
GOAL_AGGRESSIVE_COST = 0.10  # 16 clients polling every 10 ms: at most 10 % slower than polite ones


def goals(results: dict) -> list[dict]:
    """Each goal of the issue: the measured value, the target, and whether it is met (None: not measured)."""
    rows = {r["name"]: r for r in results["rows"]}
    single = rows.get("engine ×1")
    http16, http1, http16_fast = rows.get("HTTP ×16"), rows.get("HTTP ×1"), rows.get("HTTP fast ×16")
    batched = rows.get(f"engine ×{results['max_concurrency']}")
    fast = results.get("step_cache_quality") or {}
    out = []

    def goal(name: str, value, target: str, met) -> None:
        out.append({"goal": name, "value": value, "target": target, "met": met})

    for label, row in (("exact", single), ("fast preset", rows.get("engine fast ×1"))):
        speedup = row.get("latency_speedup_vs_stock") if row else None
        goal(f"single edit vs stock (p50 latency), {label}", speedup, f"≥ {GOAL_SINGLE_SPEEDUP:g}×", None if speedup is None else speedup >= GOAL_SINGLE_SPEEDUP)
    for label, row in (("", http16), (", fast preset", http16_fast)):
        through = row.get("throughput_vs_stock") if row else None
        goal(f"throughput at 16 concurrent (HTTP) vs stock{label}", through, f"≥ {GOAL_THROUGHPUT_16:g}×",
             None if through is None else through >= GOAL_THROUGHPUT_16)
    fewer, loss = fast.get("fewer_evals"), fast.get("psnr_loss_db")
    goal("fast preset: fewer evaluations", fewer, f"≥ {GOAL_FEWER_EVALS:g}×", None if fewer is None else fewer >= GOAL_FEWER_EVALS)
    goal("fast preset: PSNR loss to targets", loss, f"≤ {GOAL_PSNR_LOSS_DB:g} dB", None if loss is None else loss <= GOAL_PSNR_LOSS_DB)
    frac = batched.get("fraction_of_peak") if batched else None
    goal("batched denoising, fraction of matmul peak", frac, f"≥ {GOAL_PEAK_FRACTION:.0%}", None if frac is None else frac >= GOAL_PEAK_FRACTION)
    overhead = http1.get("http_overhead_p50_ms") if http1 else None
    goal("HTTP overhead p50 (1 concurrent)", overhead, f"< {GOAL_HTTP_OVERHEAD_MS:g} ms", None if overhead is None else overhead < GOAL_HTTP_OVERHEAD_MS)
    cold = next((r for r in results["rows"] if r["name"].startswith("HTTP cold start")), None)
    speedup = cold.get("latency_speedup_vs_stock") if cold else None
    goal("single edit vs stock from a cold start (HTTP, defaults, empty compile cache)", speedup, f"≥ {GOAL_SINGLE_SPEEDUP:g}×",
         None if speedup is None else speedup >= GOAL_SINGLE_SPEEDUP)
    aggressive = next((r for r in results["rows"] if r["name"].startswith("HTTP aggressive pollers")), None)
    polite = rows.get(f"HTTP ×{aggressive['concurrency']}") if aggressive else None
    cost = polite["images_per_second"] / aggressive["images_per_second"] - 1 if aggressive and polite else None
    goal("throughput lost to pollers asking every 10 ms (16 concurrent)", cost, f"≤ {GOAL_AGGRESSIVE_COST:.0%}",
         None if cost is None else cost <= GOAL_AGGRESSIVE_COST)
    start = (results.get("server") or {}).get("start_to_first_accepted_s")
    goal("server start → first accepted run", start, f"< {GOAL_START_S:g} s", None if start is None else start < GOAL_START_S)
    return out


def _num(value, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return fmt.format(value)


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["configuration", "p50 ms", "p95 ms", "images/s", "× stock", "evals/image", "GFLOP/s", "% peak", "HTTP overhead p50 ms"]
    lines = []
    for r in results["rows"]:
        lines.append([
            r["name"], _num(r["latency_p50_ms"], "{:.0f}"), _num(r["latency_p95_ms"], "{:.0f}"), _num(r["images_per_second"], "{:.2f}"),
            _num(r.get("throughput_vs_stock"), "{:.2f}"), _num(r["transformer_evals_per_image"], "{:.1f}"),
            _num(r.get("transformer_gflops_per_second"), "{:.1f}"),
            _num(100 * r["fraction_of_peak"] if r.get("fraction_of_peak") else None, "{:.0f}%"),
            _num(r.get("http_overhead_p50_ms"), "{:.1f}"),
        ])
    return headers, lines


def goals_table(results: dict) -> tuple[list[str], list[list[str]]]:
    def value(g):
        v = g["value"]
        if v is None:
            return "not measured"
        if "fraction" in g["goal"] or "lost" in g["goal"]:
            return f"{100 * v:.0f}%"
        unit = " dB" if "dB" in g["target"] else " ms" if "ms" in g["target"] else " s" if g["target"].endswith(" s") else "×"
        return f"{v:.2f}{unit}"

    return ["goal", "measured", "target", "met"], [[g["goal"], value(g), g["target"], {True: "yes", False: "no", None: "–"}[g["met"]]] for g in results["goals"]]


def _machine_line(m: dict | None) -> str:
    if not m:
        return "not recorded"
    return f"{m['cpu']}, {m['cores']} cores, {' '.join(m['flags']) or 'no AVX2'} (torch: {m['torch_cpu_capability']})"


def _draws(results: dict) -> str:
    k = results.get("consensus") or 1
    return "" if k == 1 else f" × {k} draws (each output the median of {k} denoisings)"


def markdown(results: dict) -> str:
    q, server = results["step_cache_quality"], results["server"]
    peak = results["peak_gflops_per_second"]
    flops = ", ".join(f"{size}: {g:.2f}" for size, g in results["transformer_gflops_per_image_pass"].items())
    server_line = (f"process start → /v1/health: {server['start_to_healthy_s']:.2f} s; → first run accepted: {server['start_to_first_accepted_s']:.2f} s."
                   if server else "HTTP was skipped.")
    splits = [(r["name"], r["overhead_split_p50_ms"]) for r in results["rows"] if r.get("overhead_split_p50_ms")]
    if splits:
        server_line += "\n\nWhere the HTTP overhead goes (p50 ms): the POST round trip (validate, store, commit); the\n" \
            "dispatcher before the engine (claim and start the run) and after it (encode, store); the hop\n" \
            "to the engine process and back (the dispatcher's engine call − the engine's own time).\n\n" + markdown_table(
                ["configuration", "POST", "dispatch in", "engine hop", "dispatch out"],
                [[name, *(_num(split.get(k), "{:.1f}") for k in ("post", "dispatch_input", "engine_hop", "dispatch_output"))] for name, split in splits])
    return f"""# Speed benchmark

Model `{results["model"]}` ({results["directory"]}): {results["steps"]} steps{_draws(results)}, guidance {results["guidance"]},
{results["n"]} held-out edits per configuration (sizes {", ".join(results["sizes"])}), seeds {results["seed"]}…{results["seed"] + results["n"] - 1},
{results["threads"]} torch threads everywhere, engine dtype {results["engine_dtype"]}.
Machine: {_machine_line(results.get("machine"))}.
Reference for "× stock": **{results["reference"] or "–"}** (the faster stock configuration).

## Goals

{markdown_table(*goals_table(results))}

## Configurations

{markdown_table(*summary_table(results))}

![images per second](speed.png)

- **stock diffusers**: `FluxKontextPipeline.from_pretrained(dir, dtype=…)`, one request at a time.
- **engine ×c**: our engine in the benchmark's process with c requests in flight (closed loop);
  **fast**: with the step cache ({q["config"]}).
- **HTTP ×c**: `incontext serve` in a subprocess, c clients each POSTing a run (data URI, sync_mode)
  and polling it. Latency is POST sent → the run's `completed_at` + one GET round trip;
  HTTP overhead is that minus the engine's own time for the run (`output.timings_ms.total`).
  The server runs the exact sampler, so its evaluations per image are the steps × the model's
  draws (the fast server's: the step cache's count for these steps × the draws).
- **HTTP fast ×c**: a second server started with `INCONTEXT_ENGINE_STEP_CACHE` set to the fast
  preset, at the largest concurrency: what serving the fast preset gives.
- **× stock**: images/s over the reference's. **GFLOP/s**: transformer FLOPs (linear layers and
  attention, from the config: {flops} GFLOP per image per pass) over the time inside forward calls;
  **% peak**: of the best {results["matmul_size"]}² matmul in the engine's dtype
  (fp32 {peak["float32"]:.0f}, bf16 {peak["bfloat16"]:.0f} GFLOP/s measured in this run).

## Step cache ("fast" preset)

{q["config"]}: {q["evals_per_image"]:.1f} transformer evaluations per image instead of {q.get("exact_evals_per_image", results["steps"]):g} ({q["fewer_evals"]:.2f}× fewer).
PSNR of its outputs to the exact outputs: {_num(q["psnr_fast_to_exact_db"])} dB. PSNR to the held-out targets: exact
{_num(q["psnr_exact_to_targets_db"])} dB, fast {_num(q["psnr_fast_to_targets_db"])} dB (loss {_num(q["psnr_loss_db"], "{:.2f}")} dB).

## Server

{server_line}
"""


def chart(results: dict) -> Image.Image:
    """Horizontal bars of images/s per configuration."""
    rows = results["rows"]
    label_w, bar_w, row_h, pad = 190, 520, 26, 12
    width, height = label_w + bar_w + 90, 2 * pad + 22 + row_h * len(rows)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((pad, pad), f"images per second, {results['model']}, {results['steps']} steps", fill=(0, 0, 0), font=font)
    top = max((r["images_per_second"] for r in rows if math.isfinite(r["images_per_second"])), default=1.0) or 1.0
    colours = {"stock": (150, 150, 150), "engine": (60, 110, 200), "http": (230, 130, 40)}
    for i, r in enumerate(rows):
        y = pad + 22 + i * row_h
        value = r["images_per_second"] if math.isfinite(r["images_per_second"]) else 0.0
        draw.text((pad, y + 6), r["name"].replace("×", "x"), fill=(0, 0, 0), font=font)  # the default font has no ×
        draw.rectangle((label_w, y + 3, label_w + max(1, int(bar_w * value / top)), y + row_h - 3), fill=colours[r["kind"]])
        draw.text((label_w + int(bar_w * value / top) + 6, y + 6), f"{value:.2f}", fill=(0, 0, 0), font=font)
    return img


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown(results))
    (out_dir / "results.json").write_text(json.dumps(jsonable(results), indent=2) + "\n")
    chart(results).save(out_dir / "speed.png")
