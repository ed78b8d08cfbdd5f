"""Tiny random models for tests: the real code path in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

from incontext.models.components import NanoConfig, build_components, save_model_dir
from incontext.world.language import vocabulary


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Kontext model directory (diffusers layout) at `path` and return it."""
    cfg = NanoConfig.tiny(vocabulary())
    c = build_components(cfg, seed=seed)
    # Non-trivial latent normalisation, so tests catch a missing shift/scale.
    c.vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    preset = {"num_inference_steps": 4, "guidance_scale": 3.5, "max_sequence_length": cfg.max_text_tokens, "target_area": 64 * 64, "multiple": 16}
    return save_model_dir(c, Path(path), preset=preset)
