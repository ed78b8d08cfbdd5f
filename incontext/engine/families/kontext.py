"""FLUX.1 Kontext (`FluxKontextPipeline`): the adapter over `incontext.sampler`.

Conditioning per request: T5 token states `txt` (1, L, D) and CLIP's pooled `vec` (1, P);
the edited image's tokens are appended to the target's sequence with RoPE index 1, each
further reference image's after them with index 2, 3, … (beyond what FLUX.1 Kontext was
trained for: it saw one context image), and guidance is an embedding. A model directory
that declares true CFG (incontext.json `true_cfg_scale`, `sampler.TrueCfg`) adds each row's
twin without the instruction to the same forward, as Qwen's rows with a negative prompt do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from incontext import sampler
from incontext.engine.protocol import MAX_IMAGES
from incontext.models.loader import load_model


@dataclass(frozen=True)
class KontextBatch:
    img_cond: torch.Tensor  # (B, kN, 4C): k images per row
    txt: torch.Tensor  # (B, L, D)
    vec: torch.Tensor  # (B, P)
    guidance: torch.Tensor  # (B,)
    img_ids: torch.Tensor  # ((1 + k)N, 3)
    txt_ids: torch.Tensor  # (L, 3)
    height: int
    width: int
    negative: tuple[torch.Tensor, torch.Tensor] | None = None  # the empty prompt's (txt, vec) where the model uses true CFG
    cfg_rows: torch.Tensor | None = None  # (B,) bool: the rows that take it (EditRequest.true_cfg); None: all

    def rows(self, index: torch.Tensor) -> "KontextBatch":
        cfg_rows = None if self.cfg_rows is None else self.cfg_rows.index_select(0, index)
        return KontextBatch(self.img_cond.index_select(0, index), self.txt.index_select(0, index), self.vec.index_select(0, index),
                            self.guidance.index_select(0, index), self.img_ids, self.txt_ids, self.height, self.width, self.negative,
                            cfg_rows)


class Kontext:
    name = "kontext"
    pipeline_class = "FluxKontextPipeline"
    compiles = True
    prompt_sees_images = False
    max_images = MAX_IMAGES

    def load(self, directory: Path, *, device: str, dtype, max_sequence_length: int | None) -> sampler.Models:
        return load_model(directory, device=device, dtype=dtype, max_sequence_length=max_sequence_length)

    def encode_prompt(self, m: sampler.Models, prompt: str, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        return sampler.encode_text(m, [prompt])

    def encode_images(self, m: sampler.Models, images: list[Image.Image]) -> torch.Tensor:
        return sampler.encode_images(m, images)

    def schedule(self, m: sampler.Models, num_steps: int, seq_len: int) -> tuple[list[float], list[float]]:
        return sampler.schedule(num_steps, seq_len, m.scheduler_config)

    def initial_latents(self, m: sampler.Models, seed: int, reference: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return sampler.initial_latents(m, seed, reference, height, width)

    def batch(self, m: sampler.Models, prompts: list[tuple[torch.Tensor, torch.Tensor]], references: list[tuple[torch.Tensor, ...]],
              guidance: list[float], height: int, width: int, true_cfg: list[bool] | None = None) -> KontextBatch:
        txt = torch.cat([t for t, _ in prompts])
        img_ids, txt_ids = sampler.kontext_ids(height, width, m.vae_scale_factor, txt.shape[1], len(references[0]))
        return KontextBatch(img_cond=sampler.stack_images(references), txt=txt, vec=torch.cat([v for _, v in prompts]),
                            guidance=torch.tensor(guidance), img_ids=img_ids, txt_ids=txt_ids, height=height, width=width,
                            negative=sampler.empty_text(m) if m.true_cfg.on else None,
                            cfg_rows=None if true_cfg is None else torch.tensor(true_cfg, dtype=torch.bool))

    def velocity(self, m: sampler.Models, batch: KontextBatch, img: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sampler.guided_velocity(m, img=img, img_cond=batch.img_cond, txt=batch.txt, vec=batch.vec, negative=batch.negative,
                                       timesteps=timesteps, guidance=batch.guidance, img_ids=batch.img_ids, txt_ids=batch.txt_ids,
                                       height=batch.height, width=batch.width, cfg_rows=batch.cfg_rows)

    def decode(self, m: sampler.Models, img: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        return sampler.decode(m, img, height, width)


KONTEXT = Kontext()
