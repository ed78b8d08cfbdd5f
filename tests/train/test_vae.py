"""Growing the nano model's autoencoder and putting it into a model directory
(`incontext train vae --widen/--deepen/--anchor`, `incontext train export-vae`), on the tiny
model. Budgets are about a second, so each run is a few steps."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from diffusers import AutoencoderKL
from typer.testing import CliRunner

from incontext.cli import app
from incontext.models.components import NanoConfig, build_vae
from incontext.models.loader import load_model
from incontext.train.checkpoint import load_checkpoint
from incontext.train.vae import _to_tensor, grow_into, psnr_by_family, train_vae
from incontext.world.edits import make_example
from incontext.world.language import vocabulary
from tests.train.test_training import vae_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_cfg():
    return NanoConfig.tiny(vocabulary())


def grown(model_cfg: NanoConfig) -> NanoConfig:
    return dataclasses.replace(model_cfg, vae_channels=tuple(2 * c for c in model_cfg.vae_channels), vae_layers=model_cfg.vae_layers + 1)


def test_a_grown_autoencoder_computes_what_it_grew_from(tiny_model, model_cfg):
    """Twice the channels and one more block a level, the same latents and the same pictures:
    a transformer trained on the small one's latents keeps working with the larger decoder."""
    small = AutoencoderKL.from_pretrained(tiny_model / "vae", local_files_only=True).eval()
    large = build_vae(grown(model_cfg)).eval()
    grow_into(large, small)
    assert sum(p.numel() for p in large.decoder.parameters()) > 3 * sum(p.numel() for p in small.decoder.parameters())
    rng = random.Random(3)
    x = torch.stack([_to_tensor(make_example(rng, size=(64, 64)).context) for _ in range(2)])
    with torch.no_grad():
        z = small.encode(x).latent_dist.mode()
        torch.testing.assert_close(large.encode(x).latent_dist.mode(), z, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(large.decode(z).sample, small.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_a_grown_decoder_trains_and_goes_into_a_model_directory(tiny_model, model_cfg, tmp_path):
    """`train vae --decoder-only --init-from MODEL --widen 2 --deepen 1`, then `train
    export-vae`: the model directory gets the larger decoder and keeps its encoder's latents."""
    train_vae(tmp_path, grown(model_cfg), vae_config(decoder_only=True, lr=1e-2), init_from=tiny_model)
    weights = load_checkpoint(tmp_path / "vae.pt")["weights"]
    # Each widened channel started as two copies; training told them apart.
    c = model_cfg.vae_channels[-1]
    assert not torch.equal(weights["decoder.conv_in.weight"][:c], weights["decoder.conv_in.weight"][c:])

    r = CliRunner().invoke(app, ["train", "export-vae", "--out", str(tmp_path), "--model", str(tiny_model), "--to", str(tmp_path / "model")])
    assert r.exit_code == 0, r.output
    before = AutoencoderKL.from_pretrained(tiny_model / "vae", local_files_only=True)
    after = AutoencoderKL.from_pretrained(tmp_path / "model" / "vae", local_files_only=True)
    assert tuple(after.config.block_out_channels) == grown(model_cfg).vae_channels
    assert (after.config.shift_factor, after.config.scaling_factor) == (before.config.shift_factor, before.config.scaling_factor)
    x = _to_tensor(make_example(random.Random(4), size=(64, 64)).context)[None]
    with torch.no_grad():
        # the same latents, to the rounding of the fp16 it is stored in
        torch.testing.assert_close(after.encode(x).latent_dist.mode(), before.encode(x).latent_dist.mode(), atol=5e-3, rtol=1e-2)
    assert load_model(tmp_path / "model", dtype=torch.float32).vae.config.layers_per_block == model_cfg.vae_layers + 1
    assert (tiny_model / "transformer").is_dir() and (tmp_path / "model" / "transformer").is_dir()


def test_an_anchored_autoencoder_trains_its_encoder_in_the_latent_space_it_started_in(tiny_model, model_cfg, tmp_path):
    """`train vae --init-from MODEL --widen 2 --anchor W`: encoder and decoder train, the
    latent normalisation stays the model's (its transformer reads the same scale), and a
    resumed run keeps its anchor."""
    start = AutoencoderKL.from_pretrained(tiny_model / "vae", local_files_only=True)
    train_vae(tmp_path, grown(model_cfg), vae_config(anchor=1.0, lr=1e-2), init_from=tiny_model)
    ck = load_checkpoint(tmp_path / "vae.pt")
    assert (ck["extra"]["shift_factor"], ck["extra"]["scaling_factor"]) == (start.config.shift_factor, start.config.scaling_factor)
    assert ck["extra"]["anchor_from"] == str(tiny_model)
    c = model_cfg.vae_channels[0]
    assert not torch.equal(ck["weights"]["encoder.conv_in.weight"][:c], ck["weights"]["encoder.conv_in.weight"][c:])

    train_vae(tmp_path, grown(model_cfg), vae_config(anchor=1.0, lr=0.0))  # resumes: no init_from needed
    resumed = load_checkpoint(tmp_path / "vae.pt")
    assert resumed["step"] > ck["step"] and resumed["extra"] == ck["extra"]


def test_vae_psnr_by_family_scores_every_family_and_a_faded_decoder_lower():
    from incontext.models.registry import BUNDLED_NANO_DIR

    vae = AutoencoderKL.from_pretrained(BUNDLED_NANO_DIR / "vae", local_files_only=True)
    families = ("recolor", "text", "night")
    scores = psnr_by_family(vae, n=1, families=families)
    assert tuple(scores) == families
    faded = copy.deepcopy(vae)  # every decoded pixel pulled halfway to grey
    with torch.no_grad():
        faded.decoder.conv_out.weight.mul_(0.5)
        faded.decoder.conv_out.bias.mul_(0.5)
    assert all(psnr_by_family(faded, n=1, families=families)[k] < v for k, v in scores.items())
