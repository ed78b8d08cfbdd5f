"""Growing a trained transformer deeper (`train transformer --double-layers/--single-layers`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from incontext.models.components import NanoConfig, build_components, save_model_dir
from incontext.train.data import produce_chunks
from incontext.train.transformer import TransformerTrainConfig, load_trained, run_config, train_transformer
from incontext.world.language import vocabulary


@pytest.fixture(scope="module")
def model_cfg():
    return NanoConfig.tiny(vocabulary())


def test_a_run_can_grow_a_model_deeper_and_starts_computing_what_it_computed(model_cfg, tmp_path):
    """--double-layers / --single-layers above --init-from's: the new blocks start as the
    identity, so the grown transformer's first prediction is the stored model's."""
    components = build_components(model_cfg, seed=5)
    model = save_model_dir(components, tmp_path / "model")
    out = tmp_path / "run"
    produce_chunks(out, components.vae, 0, 1, chunk_size=4)  # the learning rate is 0: any latents do
    grown_cfg = run_config(out, model, model_cfg.vocab, double_layers=2, single_layers=3)
    assert (grown_cfg.double_layers, grown_cfg.single_layers) == (2, 3)
    grown_cfg = dataclasses.replace(model_cfg, double_layers=2, single_layers=3)
    train_transformer(out, grown_cfg, TransformerTrainConfig(minutes=1 / 60, batch=2, warmup=1, lr=0.0), components.vae, init_from=model)

    _, _, modules, _ = load_trained(out / "transformer.pt", use_ema=False)
    grown, stored = modules["transformer"], components.transformer.eval()
    assert (len(grown.transformer_blocks), len(grown.single_transformer_blocks)) == (2, 3)
    g = torch.Generator().manual_seed(0)
    tokens, words = 8, 5
    inputs = dict(hidden_states=torch.randn(1, tokens, stored.config.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, words, stored.config.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(1, stored.config.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3),
                  txt_ids=torch.zeros(words, 3), return_dict=False)
    with torch.no_grad():
        assert torch.allclose(grown(**inputs)[0], stored(**inputs)[0], atol=1e-5)
    # resumed, the run keeps its own depth; a depth below the stored model's is refused
    resumed = run_config(out, model, model_cfg.vocab)
    assert (resumed.double_layers, resumed.single_layers) == (2, 3)
    with pytest.raises(ValueError, match="grow a model, not cut it"):
        run_config(tmp_path / "other", model, model_cfg.vocab, single_layers=0)
