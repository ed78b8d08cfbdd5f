"""FLUX.2 [klein] through the engine against stock diffusers Flux2KleinPipeline on the same directory."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline
from PIL import Image, ImageDraw

from incontext.engine.families import for_directory
from incontext.engine.families.klein import KLEIN
from incontext.engine.local import LocalEngine
from incontext.engine.protocol import EditRequest
from incontext.models.registry import Registry, preset_for_directory
from incontext.testing import tiny_klein_dir


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return tiny_klein_dir(tmp_path_factory.mktemp("tiny_klein"))


@pytest.fixture(scope="module")
def stock(klein_dir):
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def klein_registry(klein_dir):
    reg = Registry(default_id="klein")
    reg.add(preset_for_directory(klein_dir, id="klein"))
    return reg


def _picture(w: int, h: int, fill=(220, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 240, 230))
    ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill=fill)
    return img


def _request(rid: str, prompt: str, image: Image.Image, seed: int, guidance: float, steps: int) -> EditRequest:
    return EditRequest(rid, "klein", prompt, image, image.width, image.height, seed, guidance_scale=guidance, num_inference_steps=steps)


def _stock(pipe, r: EditRequest) -> Image.Image:
    images = [r.image, *r.references] if r.references else r.image
    return pipe(image=images, prompt=r.prompt, height=r.height, width=r.width, num_inference_steps=r.num_inference_steps,
                guidance_scale=r.guidance_scale, generator=torch.Generator().manual_seed(r.seed), max_sequence_length=64,
                text_encoder_out_layers=(1, 2)).images[0]


def _run(registry: Registry, requests: list[EditRequest]):
    """The requests' results, all admitted before the engine's first step (so they share its batches)."""
    engine = LocalEngine(registry, dtype="float32", max_batch_size=4)
    futures = [engine.submit(r) for r in requests]
    engine.start_thread()
    try:
        return [f.result(timeout=600) for f in futures], engine.stats
    finally:
        engine.stop()
        engine.join(30)


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def test_a_klein_directory_picks_the_klein_adapter(klein_dir, klein_registry):
    assert for_directory(klein_registry.resolve("klein").directory) is KLEIN


@pytest.mark.parametrize("size,seed,guidance,steps", [((64, 64), 0, 4.0, 4), ((80, 64), 1234, 1.0, 3)])
def test_single_edit_matches_stock_pipeline(klein_registry, stock, size, seed, guidance, steps):
    r = _request("one", "make the red circle blue", _picture(*size), seed, guidance, steps)
    (ours,), _ = _run(klein_registry, [r])
    ref = _stock(stock, r)
    assert ours.images[0].size == ref.size == size
    assert _mean_diff(ours.images[0], ref) <= 1.0  # of 255
    assert np.asarray(ref).std() > 1.0  # not trivially equal (e.g. both blank)


def test_each_edit_of_a_mixed_batch_matches_stock_pipeline(klein_registry, stock):
    """Two requests in one batch, with their own prompt, image, seed and guidance (one with
    classifier-free guidance, one without), each equal to the stock pipeline run alone."""
    requests = [
        _request("cfg", "make the red circle blue", _picture(64, 64), 7, 4.0, 4),
        _request("plain", "remove the circle", _picture(64, 64, fill=(30, 160, 40)), 8, 1.0, 4),
    ]
    results, stats = _run(klein_registry, requests)
    assert max(stats.batch_sizes) == 2  # really one batch
    for r, ours in zip(requests, results):
        assert _mean_diff(ours.images[0], _stock(stock, r)) <= 1.0
    assert _mean_diff(results[0].images[0], results[1].images[0]) > 1.0


def test_guided_rows_run_their_empty_prompt_twin_in_the_same_pass(klein_dir):
    """Pixels barely show guidance on a random tiny model, so check the velocities: a row with
    guidance > 1 gets neg + g·(cond − neg), a row with guidance 1 the conditional one alone."""
    from incontext.engine.families import klein

    m = klein.load(klein_dir, dtype="float32")
    with torch.no_grad():
        prompts = [KLEIN.encode_prompt(m, p, []) for p in ("make it blue", "remove it")]
        reference = KLEIN.encode_images(m, [_picture(64, 64)])
        batch = KLEIN.batch(m, prompts, [(reference,), (reference,)], [4.0, 1.0], 64, 64)
        img = torch.randn(2, *reference.shape[1:], generator=torch.Generator().manual_seed(0))
        t = torch.tensor([900.0, 400.0])
        v = KLEIN.velocity(m, batch, img, t)

        def alone(row: int, txt: torch.Tensor) -> torch.Tensor:
            x = torch.cat([img[row : row + 1], reference], dim=1)
            out = m.transformer(hidden_states=x, encoder_hidden_states=txt, timestep=t[row : row + 1] / 1000, img_ids=batch.img_ids,
                                txt_ids=batch.txt_ids, guidance=None, return_dict=False)[0]
            return out[:, : img.shape[1]]

        cond, neg = alone(0, prompts[0]), alone(0, m.negative_txt)
        torch.testing.assert_close(v[0:1], neg + 4.0 * (cond - neg), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v[1:2], alone(1, prompts[1]), atol=1e-5, rtol=1e-4)
        # The step cache runs a subset of the batch's rows: the guided row alone, the same.
        index = torch.tensor([0])
        torch.testing.assert_close(KLEIN.velocity(m, batch.rows(index), img[index], t[index]), v[0:1], atol=1e-5, rtol=1e-4)
    assert (cond - neg).abs().max() > 1e-3  # the empty prompt really is another input


def test_reference_images_reach_the_transformer_as_the_stock_pipeline_gives_them(klein_dir, stock):
    """The tiny random model's pixels hardly tell one reference image from another, so the
    pixel parity below cannot show the order or position of the images. Check what the
    transformer receives: each row's image tokens, one image after another, and their RoPE
    ids (T = 10, 20, 30 on the target's grid) equal the pipeline's for image=[a, b, c]."""
    from incontext.engine.families import klein

    images = [_picture(64, 64), _picture(64, 64, fill=(30, 60, 220)), _picture(64, 64, fill=(40, 200, 60)).rotate(90)]
    m = klein.load(klein_dir, dtype="float32")
    with torch.no_grad():
        prompt = KLEIN.encode_prompt(m, "put them together", images)
        ours = KLEIN.batch(m, [prompt], [tuple(KLEIN.encode_images(m, [im]) for im in images)], [1.0], 64, 64)
        processed = [stock.image_processor.preprocess(im, height=64, width=64, resize_mode="crop") for im in images]
        tokens, image_ids = stock.prepare_image_latents(processed, batch_size=1, generator=torch.Generator().manual_seed(0),
                                                        device="cpu", dtype=torch.float32)
    n = tokens.shape[1] // 3
    torch.testing.assert_close(ours.reference, tokens, atol=1e-5, rtol=1e-4)
    assert torch.equal(ours.img_ids[n:], image_ids[0].to(ours.img_ids.dtype))
    assert [int(ours.img_ids[i * n, 0]) for i in range(4)] == [0, 10, 20, 30]
    assert (tokens[:, :n] - tokens[:, n : 2 * n]).abs().max() > 1e-2  # the images really differ


def test_reference_images_match_stock_pipeline_alone_and_in_a_batch(klein_registry, stock):
    """Several reference images are native to Klein: `Flux2KleinPipeline(image=[a, b])` puts
    b's tokens after a's with T = 20. Ours equals it for each of two such requests sharing a
    batch, and for a one-image request beside them (in a batch of its own)."""
    a, b = _picture(64, 64), _picture(64, 64, fill=(30, 60, 220)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    c = _picture(64, 64, fill=(40, 200, 60)).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    two = replace(_request("two", "put the blue circle beside the red one", a, 5, 4.0, 4), references=(b,))
    three = replace(_request("three", "put the green circle below", a, 6, 1.0, 4), references=(b, c))
    other = replace(two, request_id="other", prompt="swap the circles", seed=9, references=(c,))
    one = replace(two, request_id="one", references=())
    (ours, ours_other, ours_three, ours_one), stats = _run(klein_registry, [two, other, three, one])
    for r, result in ((two, ours), (other, ours_other), (three, ours_three), (one, ours_one)):
        assert _mean_diff(result.images[0], _stock(stock, r)) <= 1.0  # of 255
    assert not np.array_equal(np.asarray(ours.images[0]), np.asarray(ours_one.images[0]))  # b reached the model
    assert max(stats.batch_sizes) == 2  # two and other together; three and one each alone


# ---------------------------------------------------------------- the KV variant


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return tiny_klein_dir(tmp_path_factory.mktemp("tiny_klein_kv"), kv=True)


@pytest.fixture(scope="module")
def stock_kv(kv_dir):
    pipe = Flux2KleinKVPipeline.from_pretrained(kv_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_kv(pipe, r: EditRequest) -> Image.Image:
    """The stock KV pipeline: reference keys and values extracted at its first step, reused after; no guidance."""
    images = [r.image, *r.references] if r.references else r.image
    return pipe(image=images, prompt=r.prompt, height=r.height, width=r.width, num_inference_steps=r.num_inference_steps,
                generator=torch.Generator().manual_seed(r.seed), max_sequence_length=64, text_encoder_out_layers=(1, 2)).images[0]


def test_kv_edits_match_the_stock_kv_pipeline_alone_in_a_mixed_batch_and_with_several_images(kv_dir, stock_kv, monkeypatch):
    """Flux2KleinKVPipeline directories: each edit equals the stock KV pipeline's, alone and in
    a batch of three (other prompts, images, seeds and step counts; guidance is accepted and
    ignored, as the pipeline has none), and with two images. The reference keys and values are
    computed once per set of images, not at every step: one "extract" pass per distinct set."""
    from diffusers import Flux2Transformer2DModel

    from incontext.engine.families import klein

    reg = Registry(default_id="kv")
    reg.add(preset_for_directory(kv_dir, id="kv"))
    assert for_directory(kv_dir) is klein.KLEIN_KV
    extracts = []
    forward = Flux2Transformer2DModel.forward

    def counting(self, *args, **kwargs):
        if kwargs.get("kv_cache_mode") == "extract":
            extracts.append(kwargs["hidden_states"].shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Flux2Transformer2DModel, "forward", counting)
    a, b = _picture(64, 64), _picture(64, 64, fill=(30, 60, 220)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    c = _picture(64, 64, fill=(40, 200, 60)).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    kv = lambda rid, prompt, image, seed, guidance, steps, refs=(): replace(_request(rid, prompt, image, seed, guidance, steps),
                                                                              model_id="kv", references=refs)
    requests = [
        kv("alone", "make the red circle blue", a, 5, 1.0, 4),
        kv("other", "remove the circle", c, 6, 4.0, 3),
        kv("same images", "make it larger", a, 7, 1.0, 4),
        kv("two", "put the blue circle beside the red one", a, 8, 1.0, 4, (b,)),
    ]
    extracts_by_stock = len(extracts)
    results, stats = _run(reg, requests)
    ours_extracts = extracts[extracts_by_stock:]
    for r, result in zip(requests, results):
        ref = _stock_kv(stock_kv, r)
        assert _mean_diff(result.images[0], ref) <= 1.0  # of 255
        assert np.asarray(ref).std() > 1.0
    assert max(stats.batch_sizes) == 3  # the one-image requests shared a batch; "two" ran alone
    n = results[0].images[0].width * results[0].images[0].height // 256  # tokens of one 64×64 image (8× VAE, 2×2 patches)
    assert sorted(ours_extracts) == [n, n, 2 * n]  # {a} once for both requests of a, {c}, {a, b}: never per step
    assert _mean_diff(results[0].images[0], results[3].images[0]) > 1.0  # b reached the model
