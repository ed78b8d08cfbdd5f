"""Turn training checkpoints into a model directory (the bundled nano model is one).

    incontext train export --out runs/nano --to incontext/weights/nano --dtype bfloat16
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from incontext.models.components import Components, NanoConfig, build_scheduler, build_vae, forget_source, save_model_dir
from incontext.models.registry import BUNDLED_NANO_DIR
from incontext.train.checkpoint import load_checkpoint
from incontext.train.transformer import load_trained

log = logging.getLogger(__name__)


def load_vae(run_dir: Path, fallback: Path | None = BUNDLED_NANO_DIR):
    """The run's VAE; on a fresh machine (no vae.pt), the bundled model's, so newly encoded
    training data matches the latents the bundled transformer was trained on."""
    if not (Path(run_dir) / "vae.pt").exists() and fallback is not None and (Path(fallback) / "vae").is_dir():
        from diffusers import AutoencoderKL

        log.info("no %s/vae.pt: using the VAE of %s", run_dir, fallback)
        return AutoencoderKL.from_pretrained(Path(fallback) / "vae", local_files_only=True).eval()
    ck = load_checkpoint(Path(run_dir) / "vae.pt")
    cfg = NanoConfig.from_dict(ck["model_config"])
    vae = build_vae(cfg)
    vae.load_state_dict(ck["weights"])
    extra = ck.get("extra") or {}
    if "scaling_factor" in extra:
        vae.register_to_config(shift_factor=extra["shift_factor"], scaling_factor=extra["scaling_factor"])
    return vae.eval()


def export_model(run_dir: Path, to: Path, *, dtype: torch.dtype | None = torch.float16, steps: int = 5, guidance: float = 3.5,
                 consensus: int = 3, true_cfg_scale: float = 1.25, true_cfg_gate: float = 0.2, use_ema: bool = True) -> Path:
    run_dir = Path(run_dir)
    model_cfg, tok, modules, step = load_trained(run_dir / "transformer.pt", use_ema=use_ema)
    train_cfg = load_checkpoint(run_dir / "transformer.pt")["train_config"]
    vae = load_vae(run_dir)
    c = Components(tok, modules["text_encoder"], modules["text_encoder_2"], vae, modules["transformer"], build_scheduler(model_cfg))
    preset = {
        "description": f"incontext nano: a {sum(p.numel() for p in c.transformer.parameters()) / 1e6:.1f}M-parameter "
        f"Kontext-style model trained on the procedural world (step {step})",
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        # Each output the median of this many draws (sampler.merge_draws): nano's stray marks differ
        # from draw to draw. Three draws at 5 steps edit as well as at 10 on the benchmark, at
        # half the work (docs/training.md).
        "consensus": consensus,
        "max_sequence_length": model_cfg.max_text_tokens,
        "target_area": 128 * 128,
        "multiple": 16,
        "price_per_image": "0.04",
        # The project's own weights, under the project's licence (pyproject.toml).
        "license": "Apache-2.0",
        "training_step": step,
        # How sampling starts must match how the model was trained (sampler.FlowStart).
        "flow_start": train_cfg.get("flow_start", "noise"),
        "start_noise": train_cfg.get("start_noise", 1.0) if train_cfg.get("flow_start") == "context" else 1.0,
        # True CFG against no instruction, held off global edits (sampler.TrueCfg): measured on
        # the bundled model (docs/training.md, "True CFG"); a new model's is worth measuring again.
        "true_cfg_scale": true_cfg_scale,
        "true_cfg_gate": true_cfg_gate,
    }
    # The VAE stays fp32 here: its reconstruction is the quality floor (`export_vae` stores a
    # grown one in fp16, which reconstructs the same to 0.01 dB).
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        if dtype is not None:
            getattr(c, name).to(dtype)
    save_model_dir(c, Path(to), preset=preset)
    log.info("exported step %d to %s", step, to)
    return Path(to)


def export_vae(run_dir: Path, model: Path, to: Path, *, dtype: torch.dtype | None = torch.float16) -> Path:
    """`model` with the run's autoencoder in place of its own, written to `to` (in place when
    `to` is `model`). For a decoder trained alone (`train vae --decoder-only`): the latents
    are unchanged, so the model's transformer and its training data stay valid.

    Stored in `dtype` (None: fp32); the loader computes the VAE in fp32 whatever it is
    stored in. A grown VAE (5 M parameters) stored in fp16 reconstructs as in fp32 to
    0.01 dB (docs/training.md), at half the size."""
    model, to = Path(model), Path(to)
    vae = load_vae(run_dir, fallback=None)
    if dtype is not None:
        vae = vae.to(dtype)
    if to.resolve() != model.resolve():
        shutil.copytree(model, to, dirs_exist_ok=True)
    shutil.rmtree(to / "vae", ignore_errors=True)
    vae.save_pretrained(to / "vae", safe_serialization=True, max_shard_size="15MB")
    forget_source(to / "vae" / "config.json")
    log.info("wrote %s with the autoencoder of %s", to, run_dir)
    return to
