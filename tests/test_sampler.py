"""Our sampler against stock diffusers FluxKontextPipeline on the same directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image, ImageDraw

from incontext import sampler
from incontext.engine.invariance import make_batch_invariant
from incontext.models.loader import load_model
from incontext.testing import declaring


def _picture(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 240, 230))
    ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    return img


def _stock_args(m, img: Image.Image, prompt: str, steps: int, guidance: float = 3.5) -> dict:
    """What FluxKontextPipeline needs to edit `img` at its own size, as our sampler does."""
    w, h = img.size
    return dict(image=img, prompt=prompt, height=h, width=w, max_area=w * h, _auto_resize=False, num_inference_steps=steps,
                guidance_scale=guidance, max_sequence_length=m.max_sequence_length)


def _mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def _assert_stock_parity_and_declaration_used(m, ours, ref, img, prompt, seed, steps, **undeclared):
    """`ours` matches the stock pipeline's `ref`, and with the model's declaration set back to
    `undeclared` (attributes of `m`) the same edit draws another picture."""
    diff = _mean_abs(ours, ref)
    assert diff <= 1.0, f"mean abs difference {diff:.3f} / 255"
    for name, value in undeclared.items():
        setattr(m, name, value)
    assert _mean_abs(ours, sampler.edit(m, img, prompt, seeds=[seed], num_steps=steps)[0]) > 1.0


@pytest.fixture(scope="module")
def stock(tiny_model):
    pipe = FluxKontextPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("size,seed,guidance,steps", [((64, 64), 0, 3.5, 4), ((64, 48), 1234, 7.0, 6)])
def test_single_image_matches_stock_pipeline(tiny_model, stock, size, seed, guidance, steps):
    m = load_model(tiny_model, dtype="float32")
    img = _picture(*size)
    prompt = "make the red circle blue"
    ours = sampler.edit(m, img, prompt, seeds=[seed], num_steps=steps, guidance=guidance)[0]
    ref = stock(**_stock_args(m, img, prompt, steps, guidance), generator=torch.Generator().manual_seed(seed)).images[0]
    assert ours.size == ref.size == size
    diff = _mean_abs(ours, ref)
    assert diff <= 1.0, f"mean abs difference {diff:.3f} / 255"
    # The outputs are not trivially equal (e.g. both blank): the image has structure.
    assert np.asarray(ref).std() > 1.0


@pytest.mark.parametrize("model", ["tiny_model", "true_cfg_model"])  # with true CFG, each row's twin rides in the batch too
def test_outputs_of_one_batch_equal_separate_runs(model, request):
    m = load_model(request.getfixturevalue(model), dtype="float32")
    # As the engine runs it: BLAS picks a per-sample vector's kernel by the batch's row count
    # (engine/invariance.py), and without the hook a last bit can differ between the two runs.
    make_batch_invariant(m.transformer)
    img = _picture(64, 64)
    both = sampler.edit(m, img, "remove the circle", seeds=[3, 4], num_steps=3)
    alone = sampler.edit(m, img, "remove the circle", seeds=[4], num_steps=3)[0]
    assert np.array_equal(np.asarray(both[1]), np.asarray(alone))
    assert not np.array_equal(np.asarray(both[0]), np.asarray(both[1]))


def test_guidance_changes_the_result(tiny_model):
    m = load_model(tiny_model, dtype="float32")
    img = _picture(64, 64)
    a = sampler.edit(m, img, "make the circle green", seeds=[5], num_steps=3, guidance=1.0)[0]
    b = sampler.edit(m, img, "make the circle green", seeds=[5], num_steps=3, guidance=10.0)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_pack_unpack_round_trip():
    z = torch.randn(2, 4, 6, 8)
    assert torch.equal(sampler.unpack(sampler.pack(z), 48, 64, 8), z)


def test_schedule_matches_diffusers_shape(tiny_model):
    m = load_model(tiny_model, dtype="float32")
    ts, sigmas = sampler.schedule(5, 16, m.scheduler_config)
    assert len(ts) == 5 and len(sigmas) == 6
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


@pytest.fixture(scope="module")
def context_start_model(tiny_model, tmp_path_factory):
    """The tiny model, declaring a flow that starts at the context (as the nano model does)."""
    return declaring(tiny_model, tmp_path_factory.mktemp("context_start") / "model", flow_start="context", start_noise=0.3)


def test_context_start_matches_stock_pipeline_given_the_same_start(context_start_model):
    m = load_model(context_start_model, dtype="float32")
    assert m.flow_start == sampler.FlowStart("context", 0.3)
    img, prompt, seed, steps = _picture(64, 48), "make the red circle blue", 7, 5
    ours = sampler.edit(m, img, prompt, seeds=[seed], num_steps=steps)[0]
    start = sampler.initial_latents(m, seed, sampler.encode_images(m, [img]), 48, 64)
    pipe = FluxKontextPipeline.from_pretrained(context_start_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**_stock_args(m, img, prompt, steps), latents=start).images[0]
    # The declared start is used: the same weights started from noise give another picture.
    _assert_stock_parity_and_declaration_used(m, ours, ref, img, prompt, seed, steps, flow_start=sampler.FlowStart())


def test_context_start_without_noise_starts_at_the_context_latents(context_start_model):
    m = load_model(context_start_model, dtype="float32")
    m.flow_start = sampler.FlowStart("context", 0.0)
    cond = sampler.encode_images(m, [_picture(64, 48)])
    assert torch.equal(sampler.initial_latents(m, 3, cond, 48, 64), cond)
    m.flow_start = sampler.FlowStart("context", 0.3)
    moved = sampler.initial_latents(m, 3, cond, 48, 64) - cond
    assert moved.std().item() == pytest.approx(0.3, rel=0.2)


def test_a_bad_flow_start_in_the_model_directory_is_a_model_error(context_start_model, tmp_path):
    import json
    import shutil

    from incontext.errors import ModelError

    path = tmp_path / "model"
    shutil.copytree(context_start_model, path)
    (path / "incontext.json").write_text(json.dumps({"flow_start": "sideways"}))
    with pytest.raises(ModelError, match="flow_start"):
        load_model(path, dtype="float32")


@pytest.fixture(scope="module")
def true_cfg_model(tiny_model, tmp_path_factory):
    """The tiny model, declaring true CFG against no instruction (as the nano model does), no gate."""
    return declaring(tiny_model, tmp_path_factory.mktemp("true_cfg") / "model", true_cfg_scale=2.0)


def test_true_cfg_matches_stock_pipeline_with_its_true_cfg_scale(true_cfg_model, stock):
    m = load_model(true_cfg_model, dtype="float32")
    assert m.true_cfg == sampler.TrueCfg(2.0)
    img, prompt, seed, steps = _picture(64, 48), "make the red circle blue", 5, 4
    ours = sampler.edit(m, img, prompt, seeds=[seed], num_steps=steps)[0]
    ref = stock(**_stock_args(m, img, prompt, steps), generator=torch.Generator().manual_seed(seed), true_cfg_scale=2.0,
                negative_prompt="").images[0]
    # The declared scale is used: without it the same weights draw another picture.
    _assert_stock_parity_and_declaration_used(m, ours, ref, img, prompt, seed, steps, true_cfg=sampler.TrueCfg())


def test_the_gate_leaves_a_global_edit_its_plain_prediction(true_cfg_model):
    # A row whose predicted x0 moved more than the gate (every row, at a gate this low) steps
    # without amplification: the output is the plain model's, exactly.
    m = load_model(true_cfg_model, dtype="float32")
    make_batch_invariant(m.transformer)
    img, prompt = _picture(64, 64), "make it grayscale"
    m.true_cfg = sampler.TrueCfg(2.0, gate=1e-9)
    gated = sampler.edit(m, img, prompt, seeds=[2], num_steps=3)[0]
    m.true_cfg = sampler.TrueCfg()
    plain = sampler.edit(m, img, prompt, seeds=[2], num_steps=3)[0]
    assert np.array_equal(np.asarray(gated), np.asarray(plain))


@pytest.mark.parametrize("fields", [{"true_cfg_scale": 0.5}, {"true_cfg_scale": "strong"}, {"true_cfg_scale": 1.5, "true_cfg_gate": 0}])
def test_a_bad_true_cfg_in_the_model_directory_is_a_model_error(tiny_model, tmp_path, fields):
    from incontext.errors import ModelError

    with pytest.raises(ModelError, match="true_cfg"):
        load_model(declaring(tiny_model, tmp_path / "model", **fields), dtype="float32")


def test_a_reference_image_follows_the_context_in_the_sequence(tiny_model):
    """With one reference, each pass sees target + context + reference tokens, the reference
    at RoPE index 2 (as training appends a workflow example's second image), and the output
    is the target's tokens alone."""
    m = load_model(tiny_model, dtype="float32")
    img, ref = _picture(64, 48), Image.new("RGB", (64, 48), (30, 90, 200))
    seen = []
    hook = m.transformer.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((kwargs["hidden_states"].shape[1], kwargs["img_ids"])),
                                                   with_kwargs=True)
    try:
        latents, img_cond = sampler.denoise(m, img, "use the background of the second image", seeds=[0, 1], num_steps=2, references=(ref,))
        plain, _ = sampler.denoise(m, img, "use the background of the second image", seeds=[0, 1], num_steps=2)
    finally:
        hook.remove()
    n = img_cond.shape[1]
    assert latents.shape == plain.shape == (2, n, 4 * m.latent_channels)
    assert [tokens for tokens, _ in seen] == [3 * n, 3 * n, 2 * n, 2 * n]
    assert seen[0][1][:, 0].tolist() == [0.0] * n + [1.0] * n + [2.0] * n
    assert not torch.equal(latents, plain)  # the reference reached the model


def test_consensus_keeps_what_most_draws_agree_on_and_drops_one_draws_stray_mark():
    agreed = torch.zeros(1, 4, 8)
    stray = agreed.clone()
    stray[0, 2, 5] = 9.0  # a mark one draw alone made
    draws = torch.cat([agreed + 0.1, stray, agreed - 0.1,  # output 0's three draws
                       agreed + 1.0, agreed + 2.0, agreed + 3.0])  # output 1's
    merged = sampler.merge_draws(draws, 3)
    assert merged.shape == (2, 4, 8)
    assert merged[0].abs().max() <= 0.1 + 1e-6  # the stray 9 is gone: its element takes a draw that agrees
    assert torch.equal(merged[0, :2], agreed[0, :2]) and torch.equal(merged[1], agreed[0] + 2.0)
    assert torch.allclose(sampler.merge_draws(torch.cat([agreed, agreed + 1.0]), 2), agreed + 0.5)  # even: the middle two's mean
    assert sampler.merge_draws(stray, 1) is stray
    with pytest.raises(ValueError, match="groups of 3"):
        sampler.merge_draws(draws[:4], 3)


def test_draw_seeds_start_at_the_outputs_own_seed_and_never_meet_another_outputs():
    assert sampler.draw_seeds(7, 1) == [7]
    seeds = [s for i in range(4) for s in sampler.draw_seeds(7 + i, 8)]
    assert sampler.draw_seeds(7, 3)[0] == 7 and len(set(seeds)) == len(seeds)
