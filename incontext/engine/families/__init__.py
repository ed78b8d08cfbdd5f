"""Model families: what differs between the pipelines the engine serves, behind one small seam.

The engine's step loop (schedule → execute → update) and its bookkeeping are the same for
every model; a family adapter supplies only what depends on the model's architecture:

- `load`: a model directory → the loaded modules (any object with `vae_scale_factor`);
- `encode_prompt` / `encode_images`: one request's text conditioning (opaque to the engine,
  cached per model and prompt, and per image content where `prompt_sees_images`: Qwen's
  VL encoder reads the images with the prompt) and each of its images as packed latent
  tokens (1, N, D);
- `schedule`, `initial_latents`: the sigma schedule and one sample's starting latents;
- `batch` → `velocity`: the running batch's conditioning stacked once (each row's images,
  the edited one first, all at the output's size and as many in every row), then one denoising
  forward for its rows, returning velocities (B, N, D) for the engine's Euler update;
- `decode`: final latents → images.

Every family packs latents as 2×2 patches of the VAE's latent grid (`sampler.pack`), so
previews, change maps and the Euler update are the engine's own, not the adapter's.
`model_index.json`'s `_class_name` picks the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from incontext.engine.families.klein import KLEIN, KLEIN_KV
from incontext.engine.families.kontext import KONTEXT
from incontext.engine.families.qwen import QWEN_EDIT, QWEN_EDIT_PLUS
from incontext.errors import ModelError


class Batch(Protocol):
    """A family's stacked conditioning of the running batch, one row per sample."""

    def rows(self, index: torch.Tensor) -> "Batch":
        """The same conditioning for the rows `index` only (the samples that compute this step)."""


class Family(Protocol):
    name: str
    pipeline_class: str  # model_index.json's `_class_name`
    compiles: bool  # whether engine/compiled.py can package its transformer and VAE
    prompt_sees_images: bool  # whether encode_prompt reads the images (then cached by them too)
    max_images: int  # images one request may give, the edited one included (at most protocol.MAX_IMAGES)

    def load(self, directory: Path, *, device: str, dtype: str | torch.dtype, max_sequence_length: int | None) -> Any: ...

    def encode_prompt(self, m, prompt: str, images: list[Image.Image]) -> Any:
        """The prompt's conditioning; `images` (the edited one first) matter only where `prompt_sees_images`."""

    def encode_images(self, m, images: list[Image.Image]) -> torch.Tensor:
        """Reference images → packed latent tokens (B, N, D), normalised as the transformer sees them."""

    def schedule(self, m, num_steps: int, seq_len: int) -> tuple[list[float], list[float]]:
        """(timesteps, sigmas) with len(sigmas) = num_steps + 1, the last 0."""

    def initial_latents(self, m, seed: int, reference: torch.Tensor, height: int, width: int) -> torch.Tensor: ...

    def batch(self, m, prompts: list, references: list[tuple[torch.Tensor, ...]], guidance: list[float], height: int, width: int,
              true_cfg: list[bool] | None = None) -> Batch:
        """One row per sample: its prompt's conditioning, its images' latents (each (1, N, D),
        the edited image first; every row has as many), its guidance and whether it takes the
        model's declared true CFG (EditRequest.true_cfg; None: every row does). Families whose
        CFG is their guidance scale (Qwen, FLUX.2 base) read only `guidance`."""

    def velocity(self, m, batch: Batch, img: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Velocities (B, N, D) of the target tokens `img` (B, N, D) at `timesteps` (B,), 0–1000."""

    def decode(self, m, img: torch.Tensor, height: int, width: int) -> list[Image.Image]: ...


# Every adapter, by the pipeline class it serves.
FAMILIES: dict[str, Family] = {f.pipeline_class: f for f in (KONTEXT, KLEIN, KLEIN_KV, QWEN_EDIT_PLUS, QWEN_EDIT)}


def for_directory(directory: Path) -> Family:
    """The adapter for a model directory, from its model_index.json. A directory without a
    readable index is Kontext's: its loader says what is missing."""
    known = FAMILIES
    try:
        class_name = json.loads((Path(directory) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        class_name = None
    if class_name is None:
        return known["FluxKontextPipeline"]
    if class_name not in known:
        raise ModelError(f"{directory}: pipeline {class_name!r} is not supported; supported: {', '.join(sorted(known))}")
    return known[class_name]
