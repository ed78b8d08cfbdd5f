"""`incontext bench …`; `register(app)` adds the group to a Typer app.

    incontext bench quality                          # the bundled nano model, 50 examples per family
    incontext bench quality --model ./my-model --n 10 --steps 8 --out results/quick

A new benchmark is one more `@bench_app.command(...)` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks of a model: quality on held-out edits.", no_args_is_help=True)


@bench_app.callback()
def bench() -> None:
    """Benchmarks of a model; results go under ./results."""


@bench_app.command("quality")
def quality(
    model: Annotated[str | None, typer.Option(help="A model id (see `incontext models`) or a model directory; default: the bundled nano model.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Held-out examples per edit family.")] = 50,
    out: Annotated[Path, typer.Option(help="Folder for report.md, results.json and the grids.")] = Path("results/quality"),
    steps: Annotated[int | None, typer.Option(min=1, max=100, help="Denoising steps (default: the model's).")] = None,
    guidance: Annotated[float | None, typer.Option(min=1.0, max=20.0, help="Guidance scale (default: the model's).")] = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype: bfloat16, float16 or float32.")] = "bfloat16",
    turns: Annotated[int, typer.Option(min=1, help="Successive edits per multi-turn drift sequence.")] = 5,
) -> None:
    """Score a model on the held-out set beside "input unchanged" and the ground truth."""
    from incontext.bench.quality import run_quality
    from incontext.bench.report import summary_table
    from incontext.errors import IncontextError

    console = Console()
    try:
        with Progress(TextColumn("editing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("edits", total=None)
            results = run_quality(
                model, n, out, turns=turns, steps=steps, guidance=guidance, dtype=dtype,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
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


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
