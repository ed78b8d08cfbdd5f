"""`incontext train …`: the nano model's recipe, stage by stage (docs/training.md).

Runnable alone as `python -m incontext.train …`, which needs only torch, diffusers,
transformers, tokenizers, typer and rich: a GPU machine without the service's
dependencies can train (scripts/train_gpu.sh).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from incontext.models.registry import MAX_CONSENSUS

train_app = typer.Typer(help="Train the nano model (see docs/training.md for the recipe).", no_args_is_help=True)
console = Console()


def _fail(e: Exception) -> None:
    code = getattr(e, "code", "ERROR")
    message = getattr(e, "message", str(e))
    Console(stderr=True).print(f"[red]error[/red] {code}: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@train_app.command("vae")
def train_vae_cmd(
    out: Path = typer.Option(Path("runs/nano")), minutes: float = 15.0, lr: float = 1.5e-3,
    decoder_only: bool = typer.Option(False, help="Train the decoder alone: the latents, and a transformer trained on them, stay valid."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this model directory's VAE (e.g. incontext/weights/nano) when OUT has no checkpoint."),
    crop: int = typer.Option(64, min=16, help="Training crop side in pixels (a multiple of 8)."),
    widen: int = typer.Option(1, min=1, help="With --init-from: that VAE's channels times this, grown so it starts computing the same function."),
    deepen: int = typer.Option(0, min=0, help="With --init-from: this many more ResNet blocks a level, each starting as the identity."),
    anchor: float = typer.Option(0.0, min=0.0, help="With --init-from: keep the latents this close to its VAE's (0: free), so its transformer stays valid."),
) -> None:
    """Stage 1: the autoencoder. Resumes from OUT/vae.pt."""
    from incontext.models.components import NanoConfig
    from incontext.train.vae import VaeTrainConfig, eval_vae_psnr, grown_config, psnr_by_family, train_vae
    from incontext.train.export import load_vae
    from incontext.world.language import vocabulary

    model_cfg = NanoConfig(vocab=vocabulary())
    if (widen > 1 or deepen) and init_from is None:
        raise typer.BadParameter("--widen and --deepen grow the VAE of --init-from; give one")
    if init_from is not None:
        model_cfg = grown_config(init_from, model_cfg, widen, deepen)
    train_vae(out, model_cfg, VaeTrainConfig(minutes=minutes, lr=lr, decoder_only=decoder_only, crop=crop, anchor=anchor), init_from=init_from)
    vae = load_vae(out)
    console.print(f"VAE reconstruction PSNR (held-out): {eval_vae_psnr(vae):.2f} dB")
    console.print("by family (targets): " + ", ".join(f"{f} {v:.1f}" for f, v in psnr_by_family(vae).items()))


@train_app.command("data")
def train_data_cmd(
    out: Path = typer.Option(Path("runs/nano")), start: int = 0, chunks: int = 24, render_only: bool = False,
    families: str = typer.Option("all", help="Edit families to draw: all, basic (the six the bundled weights were trained on), workflows (remove, bgref, emblem, segment) or a comma-separated list."),
    chunk_size: int = typer.Option(1024, min=1, hidden=True),
    encode_rendered: bool = typer.Option(False, help="Only encode the chunks rendered ahead (OUT/images) into latents."),
    follow: bool = typer.Option(False, help="With --encode-rendered: keep encoding new renders until stopped."),
    device: str = typer.Option("cpu", help="Where the VAE encodes: cpu, or cuda (one GPU encoder for many --render-only processes)."),
    confusable: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of the scenes of edits that name one object (recolor, remove, move, resize, replace, segment) with two objects alike in colour or kind, so the instruction needs both words."),
) -> None:
    """Stage 2: render world examples and encode them into latent chunks (needs OUT/vae.pt unless --render-only)."""
    from incontext.train.data import encode_rendered as encode_ahead, produce_chunks, render_chunks
    from incontext.train.export import load_vae
    from incontext.errors import InvalidInput
    from incontext.world.edits import select_families

    try:
        chosen = select_families(families)
    except ValueError as e:
        _fail(InvalidInput(str(e)))
    if render_only:
        render_chunks(out, start, chunks, chunk_size=chunk_size, families=chosen, confusable=confusable)
    elif encode_rendered:
        encode_ahead(out, load_vae(out).to(device), follow=follow, batch=256 if device.startswith("cuda") else 64)
    else:
        produce_chunks(out, load_vae(out), start, chunks, chunk_size=chunk_size, families=chosen, confusable=confusable)


@train_app.command("transformer")
def train_transformer_cmd(
    out: Path = typer.Option(Path("runs/nano")), minutes: float = 65.0, batch: int = 24, lr: float = 4e-4,
    init_from: Optional[Path] = typer.Option(None, help="Start from this model directory's weights (e.g. incontext/weights/nano) when OUT has no checkpoint."),
    edit_weight: float = typer.Option(2.0, help="Extra loss weight on the tokens the edit changes."),
    uniform_t: float = typer.Option(0.5, min=0.0, max=1.0, help="Share of rows with t uniform over the schedule (the rest logit-normal)."),
    guidance_start: float = typer.Option(0.25, min=0.0, max=1.0, help="Share of the run before guidance distillation starts (0 when continuing a guided model)."),
    flow_start: str = typer.Option("context", help="Where the flow starts at t = 1: context (the context latents plus --start-noise·noise) or noise (FLUX's)."),
    start_noise: float = typer.Option(0.3, min=0.0, max=10.0, help="σ of the noise added to the context at t = 1 (with --flow-start context)."),
    text_context: float = typer.Option(0.0, min=0.0, help="Weight of the loss that has each T5 output name the words before and after it (0: off)."),
    neighbour_heads: bool = typer.Option(False, help="When the run starts, point two heads of the T5's first layer at each word's neighbours, so its outputs carry the words' order."),
    device: str = typer.Option("cpu", help="cpu, or cuda on a GPU machine (bf16 autocast there)."),
    save_every: float = typer.Option(5.0, min=0.1, help="Minutes between checkpoints; new chunks under OUT/data are picked up at each."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: on CUDA, and on CPUs with bf16 units)."),
    double_layers: Optional[int] = typer.Option(None, min=1, help="Double-stream blocks (default: --init-from's, else 2). More than --init-from's grows it: the new blocks start as the identity."),
    single_layers: Optional[int] = typer.Option(None, min=1, help="Single-stream blocks (default: --init-from's, else 4); grows as --double-layers does."),
) -> None:
    """Stage 3: the transformer and text encoders on the latent chunks. Resumes from OUT/transformer.pt."""
    from incontext.train.export import load_vae
    from incontext.train.transformer import TransformerTrainConfig, run_config, train_transformer
    from incontext.world.language import vocabulary

    try:
        model_cfg = run_config(out, init_from, vocabulary(), double_layers=double_layers, single_layers=single_layers)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    train_transformer(out, model_cfg, TransformerTrainConfig(minutes=minutes, batch=batch, lr=lr, edit_weight=edit_weight, uniform_t=uniform_t, guidance_start=guidance_start,
                                                                              flow_start=flow_start, start_noise=start_noise, text_context=text_context, neighbour_heads=neighbour_heads, device=device, save_every_minutes=save_every,
                                                                              **({"bf16": bf16} if bf16 is not None else {"bf16": True} if device.startswith("cuda") else {})), load_vae(out), init_from=init_from)


@train_app.command("export")
def train_export_cmd(
    out: Path = typer.Option(Path("runs/nano")), to: Path = typer.Option(Path("incontext/weights/nano")),
    dtype: str = typer.Option("float16", help="Storage dtype of the transformer and text encoders (float16, bfloat16, float32)."),
    ema: bool = typer.Option(True, help="Export the EMA weights (else the raw ones)."),
    steps: int = typer.Option(5, min=1, max=50, help="The model's default number of denoising steps (incontext.json)."),
    consensus: int = typer.Option(3, min=1, max=MAX_CONSENSUS, help="Draws per output, whose median it is (incontext.json)."),
    true_cfg_scale: float = typer.Option(1.25, min=1.0, max=10.0, help="True CFG against no instruction (incontext.json; 1: off)."),
    true_cfg_gate: float = typer.Option(0.2, min=1e-6, help="Above this median latent change a step is a global edit's and runs without true CFG."),
) -> None:
    """Write the trained model as a FluxKontextPipeline directory (the bundled model lives in incontext/weights/nano)."""
    import torch

    from incontext.train.export import export_model

    export_model(out, to, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[dtype], use_ema=ema, steps=steps, consensus=consensus,
                 true_cfg_scale=true_cfg_scale, true_cfg_gate=true_cfg_gate)
    console.print(f"exported to {to}")


@train_app.command("export-vae")
def train_export_vae_cmd(
    out: Path = typer.Option(Path("runs/nano"), help="The run whose vae.pt to take."),
    model: Path = typer.Option(Path("incontext/weights/nano"), help="The model directory that gets it."),
    to: Optional[Path] = typer.Option(None, help="Where to write the result (default: MODEL, in place)."),
    dtype: str = typer.Option("float16", help="Storage dtype (float16, float32); it computes in fp32 either way."),
) -> None:
    """Put a run's autoencoder into a model directory (after `train vae --decoder-only`: same latents, sharper decoder)."""
    import torch

    from incontext.train.export import export_vae

    if dtype not in ("float16", "float32"):
        raise typer.BadParameter(f"--dtype must be float16 or float32, not {dtype}")
    console.print(f"wrote {export_vae(out, model, to or model, dtype=torch.float16 if dtype == 'float16' else None)}")


@train_app.command("selector")
def train_selector_cmd(
    model: Path = typer.Option(Path("incontext/weights/nano"), help="The model directory whose text encoders it reads, and which gets it."),
    examples: int = typer.Option(12_000, min=10, help="Training examples (world scenes with a thing to mask)."),
    minutes: float = typer.Option(5.0, min=0.01), lr: float = 2e-3,
) -> None:
    """The head that picks the segments a phrase names (incontext/selector.py): segmentation's and removal's mask."""
    from incontext.train.selector import train_selector

    result = train_selector(model, n=examples, minutes=minutes, lr=lr)
    console.print(f"{result['steps']} steps on {result['examples']} examples, loss {result['loss']:.4f}; picked the "
                  f"right segments in {result['picked_right']:.1%} of held-out examples; wrote {model / 'selector'}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    train_app()

