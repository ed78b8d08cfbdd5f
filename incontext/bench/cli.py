"""`incontext bench …`; `register(app)` adds the group to a Typer app.

    incontext bench quality                          # the bundled nano model, 50 examples per family
    incontext bench quality --model ./my-model --n 10 --steps 8 --out results/quick
    incontext bench speed                            # stock diffusers vs the engine vs HTTP, bundled model
    incontext bench speed --model ./my-model --n 8 --concurrency 1,4 --skip-stock --out results/quick-speed
    incontext bench load                             # peak memory under palette bombs, huge bodies, trickling fetches

A new benchmark is one more `@bench_app.command(...)` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from incontext.models.registry import MAX_CONSENSUS

bench_app = typer.Typer(help="Benchmarks of a model: quality and speed on held-out edits.", no_args_is_help=True)


@bench_app.callback()
def bench() -> None:
    """Benchmarks of a model; results go under ./results."""


@bench_app.command("quality")
def quality(
    model: Annotated[str | None, typer.Option(help="A model id (see `incontext models`) or a model directory; default: the bundled nano model.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Held-out examples per edit family (20 or more: one of 6 is 17 points).")] = 20,
    out: Annotated[Path, typer.Option(help="Folder for report.md, results.json and the grids.")] = Path("results/quality"),
    steps: Annotated[int | None, typer.Option(min=1, max=100, help="Denoising steps (default: the model's).")] = None,
    guidance: Annotated[float | None, typer.Option(min=1.0, max=20.0, help="Guidance scale (default: the model's).")] = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (bf16 only where the CPU has bf16 units), bfloat16, float16 or float32.")] = "auto",
    turns: Annotated[int, typer.Option(min=1, help="Successive edits per multi-turn drift sequence.")] = 5,
    families: Annotated[str, typer.Option(help="all, basic (recolor, remove, add, move, background, grayscale), workflows (remove, bgref, emblem, segment) or a comma-separated list.")] = "all",
    consensus: Annotated[int | None, typer.Option(min=1, max=MAX_CONSENSUS, help="Denoisings per output, whose median it is (default: the model's).")] = None,
    regions: Annotated[str, typer.Option(help="Extra rows preserved by another edit region: contrast (DiffEdit's), both (latents that moved within it), comma-separated.")] = "",
) -> None:
    """Score a model on the held-out set beside "input unchanged" and the ground truth."""
    from incontext.bench.quality import run_quality
    from incontext.bench.report import summary_table
    from incontext.errors import IncontextError

    console = _wide_console()
    try:
        with Progress(TextColumn("editing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("edits", total=None)
            results = run_quality(
                model, n, out, turns=turns, steps=steps, guidance=guidance, dtype=dtype, families=families, consensus=consensus,
                regions=tuple(r for r in regions.split(",") if r), on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    except IncontextError as e:
        Console(stderr=True).print(f"[red]error[/red] {e.code}: {e.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    headers, lines = summary_table(results)
    table = Table(*headers, title=f"quality, {n} held-out examples per family")
    for line in lines:
        table.add_row(*line)
    console.print(table)
    console.print(f"report: {out / 'report.md'}", highlight=False)


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers such as 1,4,8,16, not {text!r}") from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter("concurrency levels must be at least 1")
    return levels


@bench_app.command("speed")
def speed(
    model: Annotated[str | None, typer.Option(help="A model id (see `incontext models`) or a model directory; default: the bundled nano model.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Requests per configuration (held-out edits).")] = 32,
    steps: Annotated[int | None, typer.Option(min=1, max=50, help="Denoising steps (default: the model's).")] = None,
    concurrency: Annotated[str, typer.Option(help="Concurrent requests for the HTTP runs; the largest also for the in-process engine.")] = "1,4,8,16",
    out: Annotated[Path, typer.Option(help="Folder for report.md, results.json, speed.png and server.log.")] = Path("results/speed"),
    skip_stock: Annotated[bool, typer.Option("--skip-stock", help="Do not run stock diffusers (no ratios then).")] = False,
    skip_http: Annotated[bool, typer.Option("--skip-http", help="Do not start the server.")] = False,
    step_cache: Annotated[str, typer.Option(help="The fast preset: a preset name or every,first,last (e.g. 3,3,2).")] = "fast",
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads for every configuration (default: torch's).")] = None,
    compile: Annotated[bool, typer.Option(help="Compile the engine's transformer as the server does by default (eager rows are added beside).")] = True,
    families: Annotated[bool, typer.Option("--families", help="Also a row per model family (Kontext, Klein, Qwen-Image-Edit) on tiny random directories: engine at 8 in flight over stock.")] = False,
) -> None:
    """Stock diffusers, our engine in-process and over HTTP, and the fast preset, side by side."""
    from incontext.bench import speed as speed_bench
    from incontext.bench import speed_report
    from incontext.errors import IncontextError

    levels = _levels(concurrency)
    console = _wide_console()
    try:
        with console.status("measuring") as status:
            results = speed_bench.run_speed(
                model, n, out, steps=steps, concurrency=levels, skip_stock=skip_stock, skip_http=skip_http,
                step_cache=step_cache, threads=threads, compile=compile, on_stage=lambda stage: status.update(f"measuring: {stage}"),
            )
    except IncontextError as e:
        Console(stderr=True).print(f"[red]error[/red] {e.code}: {e.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except ValueError as e:
        Console(stderr=True).print(f"[red]error[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for title, (headers, lines) in ((f"speed, {results['n']} edits per configuration, {results['steps']} steps", speed_report.summary_table(results)),
                                    ("goals", speed_report.goals_table(results))):
        table = Table(*headers, title=title)
        for line in lines:
            table.add_row(*line)
        console.print(table)
    if families:
        _family_rows(out, console)
    console.print(f"report: {out / 'report.md'}", highlight=False)


def _family_rows(out: Path, console) -> None:
    import json
    import tempfile

    from incontext.bench import families as family_bench

    with console.status("measuring: model families"), tempfile.TemporaryDirectory() as work:
        rows = family_bench.tiny_rows(Path(work))
    (out / "families.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "families.md").write_text(family_bench.markdown(rows) + "\n")
    table = Table("family", "stock s/image", "engine ×8 images/s", "× stock", "pixel diff", title="model families (tiny, CPU)")
    for r in rows:
        table.add_row(r["family"], f"{r['stock_s_per_image']:.3f}", f"{r['engine_concurrent_images_per_s']:.2f}",
                      f"{r['throughput_over_stock']:.2f}", f"{r['mean_pixel_diff_to_stock']:.2f}")
    console.print(table)


@bench_app.command("load")
def load(
    out: Annotated[Path, typer.Option(help="Folder for results.json and the server's log.")] = Path("results/load"),
    bombs: Annotated[int, typer.Option(min=1, help="Palette-bomb runs sent at once.")] = 4,
    tricklers: Annotated[int, typer.Option(min=1, help="Runs at once whose image_url trickles a byte every 0.1 s.")] = 40,
    batch: Annotated[int, typer.Option(min=1, max=100, help="Items of key A's batch that key B's single edit follows.")] = 48,
    model: Annotated[str | None, typer.Option(help="The model directory the server serves (default: the bundled one).")] = None,
    only: Annotated[str | None, typer.Option(help="'hostile' or 'fairness': that part only.")] = None,
    per_key: Annotated[int | None, typer.Option(help="The server's INCONTEXT_MAX_CONCURRENT_RUNS_PER_KEY (default: its own).")] = None,
) -> None:
    """The server's memory and a bystander's reads under hostile inputs, and one key's edit
    behind another key's batch (bench/load.py)."""
    from incontext.bench.load import run_load

    console = _wide_console()
    with console.status("hostile inputs against a local server"):
        result = run_load(out, bombs=bombs, tricklers=tricklers, batch=batch, model=model, hostile=only != "fairness", fair=only != "hostile",
                          env_extra={} if per_key is None else {"INCONTEXT_MAX_CONCURRENT_RUNS_PER_KEY": str(per_key)})
    table = Table("scenario", "answers", "errors", "s", "RSS before MB", "peak RSS MB", "RSS after MB", "RSS settled MB",
                  "bystander GET ms p50/p95/max", title="bench load: the HTTP process")
    for row in result["rows"]:
        get = row["bystander_get_ms"]
        ms = "" if not get["n"] else f"{get['p50']:.0f}/{get['p95']:.0f}/{get['max']:.0f} (n={get['n']})"
        settled = "" if row["rss_settled_mb"] is None else str(row["rss_settled_mb"])
        table.add_row(row["scenario"], ",".join(map(str, row["answers"])), str(row["errors"]), f"{row['seconds']:.1f}",
                      str(row["rss_before_mb"]), str(row["peak_rss_mb"]), str(row["rss_after_mb"]), settled, ms)
    console.print(table)
    if f := result["fairness"]:
        console.print(f"fairness: key B's edit alone {f['b_alone_median_s']:.2f} s (median of {f['b_alone_s']}), behind key A's "
                      f"{f['batch_items']}-item batch {f['b_behind_batch_s']:.2f} s ({f['ratio']:.1f}×; goal ≤ 2×); "
                      f"the batch ended at {f['batch_done_at_s']:.1f} s", highlight=False)
    console.print(f"results: {out / 'results.json'}", highlight=False)


@bench_app.command("scale")
def scale(
    out: Annotated[Path, typer.Option(help="Folder for results.json and the servers' logs.")] = Path("results/scale"),
    replicas: Annotated[str, typer.Option(help="Worker replica counts to measure, comma-separated.")] = "1,2,4",
    runs: Annotated[int, typer.Option(min=1, max=200, help="Edits submitted at once per configuration.")] = 16,
    steps: Annotated[int, typer.Option(min=1, max=50, help="Denoising steps per edit.")] = 8,
    database_url: Annotated[str | None, typer.Option(help="A PostgreSQL to use (default: a throwaway cluster, initdb).")] = None,
    lease_seconds: Annotated[float | None, typer.Option(min=1, help="The servers' INCONTEXT_LEASE_SECONDS (default: theirs).")] = None,
    failover: Annotated[bool, typer.Option(help="Also kill a worker mid-edit and time its runs' resumption.")] = True,
) -> None:
    """Throughput of the Ray Serve application with 1, 2, 4 worker replicas against the
    single-process server, and a worker's kill to its runs resuming elsewhere (bench/scale.py)."""
    from incontext.bench.scale import run_scale

    counts = tuple(int(n) for n in replicas.split(",") if n.strip())
    console = _wide_console()
    with console.status("servers one after another (a Ray cluster starts for each)"):
        result = run_scale(out, replicas=counts, runs=runs, steps=steps, database_url=database_url,
                           failover=failover, lease_seconds=lease_seconds)
    table = Table("configuration", "runs", "seconds", "runs/s", "failed", title=f"bench scale: {result['cpus']} cores, {steps} steps an edit")
    for row in result["rows"]:
        table.add_row(row["config"], str(row["runs"]), f"{row['seconds']:.1f}", f"{row['runs_per_s']:.2f}", ",".join(row["failed"]) or "-")
    console.print(table)
    if f := result["failover"]:
        console.print(f"failover (2 workers, one SIGKILLed mid-edit, lease {f['lease_seconds']} s): claimed by another worker "
                      f"{f['kill_to_claim_s']:.1f} s after the kill, succeeded {f['kill_to_success_s']:.1f} s after it; "
                      f"all {f['runs']} succeeded: {f['all_succeeded']}, each once: {f['each_succeeded_once']}", highlight=False)
    console.print(f"results: {out / 'results.json'}", highlight=False)


def _wide_console() -> Console:
    # Benchmark tables have many columns: never squeeze them below 160 (a pipe or a narrow
    # terminal would otherwise cut every cell to an ellipsis).
    probe = Console()
    return Console(width=max(probe.width, 160))


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
