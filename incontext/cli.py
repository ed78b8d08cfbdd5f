"""The `incontext` command line: edit images, list models, train, serve, benchmark.

    incontext edit photo.png "make the red circle blue" -o out.png
    incontext models
    incontext serve --port 8000
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from incontext.errors import IncontextError

app = typer.Typer(help="Self-hostable in-context image editing (FLUX.1 Kontext-style).", no_args_is_help=True, add_completion=False)
train_app = typer.Typer(help="Train the nano model (see docs/training.md for the recipe).", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console()
err_console = Console(stderr=True)


def _fail(e: Exception) -> None:
    code = getattr(e, "code", "ERROR")
    message = getattr(e, "message", str(e))
    err_console.print(f"[red]error[/red] {code}: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _indexed(out: Path, i: int, n: int) -> Path:
    return out if n == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")


@app.command()
def edit(
    image: Path = typer.Argument(..., help="Input image (JPEG, PNG, WebP, GIF, AVIF)."),
    prompt: str = typer.Argument(..., help='The instruction, e.g. "make the red circle blue".'),
    output: Path = typer.Option(..., "-o", "--output", help="Output file; .jpg/.jpeg/.png. With --num-images > 1, an index is added."),
    seed: Optional[int] = typer.Option(None, help="Random seed (printed; reuse it to reproduce a result)."),
    guidance: Optional[float] = typer.Option(None, min=1.0, max=20.0, help="Guidance scale 1–20 (default: the model's, 3.5)."),
    steps: Optional[int] = typer.Option(None, min=1, max=100, help="Denoising steps (default: the model's)."),
    num_images: int = typer.Option(1, "--num-images", min=1, max=4, help="Number of outputs, 1–4, from one batched pass."),
    aspect_ratio: Optional[str] = typer.Option(None, "--aspect-ratio", help="21:9 16:9 4:3 3:2 1:1 2:3 3:4 9:16 9:21 (default: the input's)."),
    model: Optional[str] = typer.Option(None, help="A model id (see `incontext models`) or a model directory."),
    quality: int = typer.Option(95, min=1, max=100, help="JPEG quality."),
    server: Optional[str] = typer.Option(None, help="Send the edit to an incontext server at this URL instead of running it here."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="INCONTEXT_API_KEY", help="Key for --server."),
) -> None:
    """Edit IMAGE as PROMPT says and write the result to OUTPUT."""
    from incontext import imageio

    try:
        fmt = imageio.format_from_suffix(output)
        if seed is None:
            seed = random.randrange(2**31)
        if server:
            images = _edit_remote(server, api_key, image, prompt, seed, guidance, steps, num_images, aspect_ratio, model, fmt)
        else:
            images = _edit_local(image, prompt, seed, guidance, steps, num_images, aspect_ratio, model)
        output.parent.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            path = _indexed(output, i, len(images))
            path.write_bytes(imageio.encode_image(img, fmt, quality=quality))
            console.print(f"wrote {path} ({img.width}×{img.height}, seed {seed + i})", highlight=False)
        console.print(f"seed: {seed}", highlight=False)
    except IncontextError as e:
        _fail(e)
    except Exception as e:  # the server's answers, when editing through --server
        from incontext.client import APIError, RunError, RunTimeout

        if isinstance(e, APIError):
            _fail(e)
        if isinstance(e, (RunError, RunTimeout)):
            run = e.run
            _fail(IncontextError(f"run {run.get('id')} {run.get('status_code')}: {run.get('failure_message') or e}", code=run.get("failure_code") or "RUN_FAILED"))
        import httpx

        if isinstance(e, (OSError, httpx.TransportError)) and server:  # connection refused, DNS, timeouts
            _fail(IncontextError(f"cannot reach {server}: {e}", code="SERVER_UNREACHABLE"))
        raise


def _edit_local(image, prompt, seed, guidance, steps, num_images, aspect_ratio, model_id):
    from incontext import imageio, sampler
    from incontext.models.loader import load_model
    from incontext.models.registry import default_registry

    src = imageio.load_image(image)
    if not prompt.strip():
        raise IncontextError("the prompt is empty: say what to change", code="INVALID_INPUT")
    preset = default_registry().resolve(model_id)
    w, h = imageio.output_size(src.width, src.height, aspect_ratio, target_area=preset.target_area, multiple=preset.multiple)
    steps = steps or preset.num_inference_steps
    guidance = guidance if guidance is not None else preset.guidance_scale
    with console.status(f"loading {preset.id}"):
        m = load_model(preset.directory, max_sequence_length=preset.max_sequence_length)
    with Progress(TextColumn("editing"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("denoise", total=steps)
        return sampler.edit(
            m, imageio.fit_to_size(src, w, h), prompt, seeds=[seed + i for i in range(num_images)], num_steps=steps,
            guidance=guidance, on_step=lambda done, total: progress.update(task, completed=done),
        )


def _edit_remote(server, api_key, image, prompt, seed, guidance, steps, num_images, aspect_ratio, model_id, fmt):
    import base64

    from incontext import imageio
    from incontext.client import Client

    data = Path(image).read_bytes() if Path(image).is_file() else None
    if data is None:
        raise IncontextError(f"no such file: {image}", code="INVALID_INPUT")
    inp = {"prompt": prompt, "image_url": "data:image/png;base64," + base64.b64encode(data).decode(), "seed": seed,
           "num_images": num_images, "output_format": fmt, "sync_mode": True}
    if guidance is not None:
        inp["guidance_scale"] = guidance
    if steps is not None:
        inp["num_inference_steps"] = steps
    if aspect_ratio:
        inp["aspect_ratio"] = aspect_ratio
    with Client(server, api_key or "") as client, console.status("waiting for the server"):
        run = client.run(model_id or "flux-pro/kontext", inp)
    return [imageio.decode_data_uri(o["url"]) for o in run["output"]["outputs"]]


@app.command()
def models() -> None:
    """List model ids, their directories and presets."""
    from incontext.models.registry import default_registry

    # One block per model rather than a table: directories are long and must not be cut.
    for p in default_registry().models.values():
        side = int(p.target_area**0.5)
        console.print(f"[bold]{p.id}[/bold]" + (f"  (aliases: {', '.join(p.aliases)})" if p.aliases else ""), highlight=False, soft_wrap=True)
        console.print(f"  directory: {p.directory}", highlight=False, soft_wrap=True)
        console.print(f"  preset: {p.num_inference_steps} steps, guidance {p.guidance_scale}, ${p.price_per_image} per image, ~{side}×{side} pixels", highlight=False)


@train_app.command("vae")
def train_vae_cmd(out: Path = typer.Option(Path("runs/nano")), minutes: float = 15.0, lr: float = 1.5e-3) -> None:
    """Stage 1: the autoencoder. Resumes from OUT/vae.pt."""
    from incontext.models.components import NanoConfig
    from incontext.train.vae import VaeTrainConfig, eval_vae_psnr, train_vae
    from incontext.train.export import load_vae
    from incontext.world.language import vocabulary

    train_vae(out, NanoConfig(vocab=vocabulary()), VaeTrainConfig(minutes=minutes, lr=lr))
    console.print(f"VAE reconstruction PSNR (held-out): {eval_vae_psnr(load_vae(out)):.2f} dB")


@train_app.command("data")
def train_data_cmd(
    out: Path = typer.Option(Path("runs/nano")), start: int = 0, chunks: int = 24, render_only: bool = False,
    families: str = typer.Option("all", help="Edit families to draw: all, basic (the six the bundled weights were trained on) or a comma-separated list."),
    chunk_size: int = typer.Option(1024, min=1, hidden=True),
) -> None:
    """Stage 2: render world examples and encode them into latent chunks (needs OUT/vae.pt unless --render-only)."""
    from incontext.train.data import produce_chunks, render_chunks
    from incontext.train.export import load_vae
    from incontext.errors import InvalidInput
    from incontext.world.edits import select_families

    try:
        chosen = select_families(families)
    except ValueError as e:
        _fail(InvalidInput(str(e)))
    if render_only:
        render_chunks(out, start, chunks, chunk_size=chunk_size, families=chosen)
    else:
        produce_chunks(out, load_vae(out), start, chunks, chunk_size=chunk_size, families=chosen)


@train_app.command("transformer")
def train_transformer_cmd(
    out: Path = typer.Option(Path("runs/nano")), minutes: float = 65.0, batch: int = 24, lr: float = 4e-4,
    init_from: Optional[Path] = typer.Option(None, help="Start from this model directory's weights (e.g. incontext/weights/nano) when OUT has no checkpoint."),
    edit_weight: float = typer.Option(2.0, help="Extra loss weight on the tokens the edit changes."),
    uniform_t: float = typer.Option(0.5, min=0.0, max=1.0, help="Share of rows with t uniform over the schedule (the rest logit-normal)."),
    guidance_start: float = typer.Option(0.25, min=0.0, max=1.0, help="Share of the run before guidance distillation starts (0 when continuing a guided model)."),
) -> None:
    """Stage 3: the transformer and text encoders on the latent chunks. Resumes from OUT/transformer.pt."""
    from incontext.models.components import NanoConfig
    from incontext.train.export import load_vae
    from incontext.train.transformer import TransformerTrainConfig, train_transformer
    from incontext.world.language import vocabulary

    train_transformer(out, NanoConfig(vocab=vocabulary()), TransformerTrainConfig(minutes=minutes, batch=batch, lr=lr, edit_weight=edit_weight, uniform_t=uniform_t, guidance_start=guidance_start), load_vae(out), init_from=init_from)


@train_app.command("export")
def train_export_cmd(
    out: Path = typer.Option(Path("runs/nano")), to: Path = typer.Option(Path("incontext/weights/nano")),
    dtype: str = typer.Option("float16", help="Storage dtype of the transformer and text encoders (float16, bfloat16, float32)."),
    ema: bool = typer.Option(True, help="Export the EMA weights (else the raw ones)."),
) -> None:
    """Write the trained model as a FluxKontextPipeline directory (the bundled model lives in incontext/weights/nano)."""
    import torch

    from incontext.train.export import export_model

    export_model(out, to, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[dtype], use_ema=ema)
    console.print(f"exported to {to}")


def _register_subcommands() -> None:
    """`serve`/`keys` and `bench` live beside the code they drive."""
    from incontext.bench.cli import register as register_bench
    from incontext.service.cli import register as register_service

    register_service(app)
    register_bench(app)


_register_subcommands()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    app()
