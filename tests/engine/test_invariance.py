"""A row's velocity is the same bits alone or inside any batch (engine/invariance.py): what
makes "same seed, same image, whatever else shares the step" hold on every set of weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from incontext.engine.invariance import make_batch_invariant
from incontext.testing import tiny_model_dir


def _inputs(config, batch: int, image_tokens: int = 128, text_tokens: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(image_tokens, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(image_tokens) // 8, torch.arange(image_tokens) % 8
    return {
        "hidden_states": torch.randn(batch, image_tokens, config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens, 3),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_row_is_the_same_bits_alone_and_in_a_batch(tmp_path, seed):
    transformer = make_batch_invariant(FluxTransformer2DModel.from_pretrained(tiny_model_dir(tmp_path / "m", seed=seed) / "transformer").eval())
    inputs = _inputs(transformer.config, batch=6)
    with torch.no_grad():
        batch = transformer(**inputs).sample
        for n in (1, 2, 3, 5):
            part = {k: v if k.endswith("_ids") else v[:n] for k, v in inputs.items()}
            assert torch.equal(transformer(**part).sample, batch[:n]), n
