"""Qwen-Image-Edit-Plus through the engine against stock diffusers QwenImageEditPlusPipeline on the same directory.

The stock pipeline resizes every image to about 1024² pixels for its VAE (`VAE_IMAGE_SIZE`);
the engine encodes them at the output's size (engine/families/qwen.py says why). At the
model's own size the two agree; at these tiny sizes the tests set that constant to the
output's area, so both see the same images.
"""

from __future__ import annotations

from dataclasses import replace

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as stock_module
import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from PIL import Image, ImageDraw

from incontext.engine.families import for_directory, qwen
from incontext.engine.families.qwen import QWEN_EDIT_PLUS
from incontext.engine.local import LocalEngine
from incontext.engine.protocol import EditRequest
from incontext.models.registry import Registry, preset_for_directory
from incontext.testing import qwen_vl_processor, tiny_qwen_edit_dir

STEPS = 3


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return tiny_qwen_edit_dir(tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="module")
def models(qwen_dir):
    return qwen.load(qwen_dir, dtype="float32")


@pytest.fixture(scope="module")
def stock(qwen_dir, models):
    processor = qwen_vl_processor(models.image_processor, models.tokenizer)
    pipe = QwenImageEditPlusPipeline.from_pretrained(qwen_dir, processor=processor, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def qwen_registry(qwen_dir):
    reg = Registry(default_id="qwen")
    reg.add(preset_for_directory(qwen_dir, id="qwen"))
    return reg


def _picture(w: int, h: int, fill=(220, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 240, 230))
    ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill=fill)
    return img


def _request(rid: str, prompt: str, image: Image.Image, seed: int, guidance: float, references=()) -> EditRequest:
    return EditRequest(rid, "qwen", prompt, image, image.width, image.height, seed, guidance_scale=guidance, num_inference_steps=STEPS,
                       references=tuple(references))


def _stock(pipe, r: EditRequest, monkeypatch) -> Image.Image:
    monkeypatch.setattr(stock_module, "VAE_IMAGE_SIZE", r.width * r.height)
    images = [r.image, *r.references] if r.references else r.image
    return pipe(image=images, prompt=r.prompt, negative_prompt=qwen.NEGATIVE_PROMPT, true_cfg_scale=r.guidance_scale, height=r.height,
                width=r.width, num_inference_steps=r.num_inference_steps, generator=torch.Generator().manual_seed(r.seed)).images[0]


def _run(registry: Registry, requests: list[EditRequest]):
    """The requests' results, all admitted before the engine's first step (so they share its batches)."""
    engine = LocalEngine(registry, dtype="float32", max_batch_size=4)
    futures = [engine.submit(r) for r in requests]
    engine.start_thread()
    try:
        return [f.result(timeout=600) for f in futures], engine
    finally:
        engine.stop()
        engine.join(30)


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def test_a_qwen_edit_plus_directory_picks_the_qwen_adapter(qwen_dir):
    assert for_directory(qwen_dir) is QWEN_EDIT_PLUS


def test_the_vl_encoder_sees_what_the_stock_processor_gives_it(models, stock):
    """The adapter builds the VL inputs from the processor's tokenizer and image processor
    (the stock processor needs torchvision to load); they equal the stock processor's, and
    the text states equal the pipeline's `encode_prompt`, for two images of another shape."""
    a, b = _picture(96, 64), _picture(96, 64, fill=(30, 60, 220)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    size = stock_module.calculate_dimensions(stock_module.CONDITION_IMAGE_SIZE, 96 / 64)
    conditions = [stock.image_processor.resize(im, size[1], size[0]) for im in (a, b)]
    template = "".join(f"Picture {i}: <|vision_start|><|image_pad|><|vision_end|>" for i in (1, 2)) + "swap them"
    theirs = stock.processor(text=[stock.prompt_template_encode.format(template)], images=conditions, padding=True, return_tensors="pt")
    ours = qwen.vl_inputs(models, "swap them", [a, b])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        txt, mask = stock.encode_prompt("swap them", image=conditions, device="cpu")
        torch.testing.assert_close(qwen.encode_text(models, "swap them", [a, b]), txt)
        other = qwen.encode_text(models, "swap them", [b, a])
    assert mask is None and (other - txt).abs().max() > 1e-3  # the images really reach the text states


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_single_edit_matches_stock_pipeline(qwen_registry, stock, monkeypatch, guidance):
    r = _request("one", "make the red circle blue", _picture(96, 64), 3, guidance)
    (ours,), _ = _run(qwen_registry, [r])
    ref = _stock(stock, r, monkeypatch)
    assert ours.images[0].size == ref.size == (96, 64)
    assert _mean_diff(ours.images[0], ref) <= 1.0  # of 255
    assert np.asarray(ref).std() > 1.0  # not trivially equal (e.g. both blank)


def test_each_edit_of_a_mixed_batch_matches_stock_pipeline(qwen_registry, stock, monkeypatch):
    """Two requests in one batch, with their own prompt (of another length: padded, masked),
    image, seed and guidance (one with true CFG, one without), each equal to the stock
    pipeline run alone; the text cache keys each prompt by its image."""
    requests = [
        _request("cfg", "make the red circle blue", _picture(64, 64), 7, 4.0),
        _request("plain", "remove it", _picture(64, 64, fill=(30, 160, 40)), 8, 1.0),
    ]
    results, engine = _run(qwen_registry, requests)
    assert max(engine.stats.batch_sizes) == 2  # really one batch
    for r, ours in zip(requests, results):
        assert _mean_diff(ours.images[0], _stock(stock, r, monkeypatch)) <= 1.0
    assert _mean_diff(results[0].images[0], results[1].images[0]) > 1.0


def test_reference_images_match_stock_pipeline_alone_and_in_a_batch(qwen_registry, stock, monkeypatch):
    """Several images are native to Qwen-Image-Edit-Plus: `pipe(image=[a, b])` labels them
    "Picture 1", "Picture 2" for the VL encoder and gives b's tokens RoPE frame 2. Ours
    equals it for two such requests sharing a batch. A third with the first one's prompt and
    other images gets its own text conditioning: the text cache keys prompts by their images."""
    a, b = _picture(64, 64), _picture(64, 64, fill=(30, 60, 220)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    c = _picture(64, 64, fill=(40, 200, 60)).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    two = _request("two", "put the blue circle beside the red one", a, 5, 4.0, references=(b,))
    other = replace(two, request_id="other", prompt="swap the circles", seed=9, guidance_scale=1.0, references=(c,))
    again = replace(two, request_id="again", references=(c,))
    (ours, ours_other, ours_again), engine = _run(qwen_registry, [two, other, again])
    assert max(engine.stats.batch_sizes) == 3
    assert len(engine.text_cache) == 3 and engine.text_cache.hits == 0
    assert _mean_diff(ours.images[0], ours_again.images[0]) > 0
    for r, result in ((two, ours), (other, ours_other)):
        assert _mean_diff(result.images[0], _stock(stock, r, monkeypatch)) <= 1.0  # of 255
    one = _stock(stock, replace(two, references=()), monkeypatch)
    assert not np.array_equal(np.asarray(ours.images[0]), np.asarray(one))  # b reached the model


def test_guided_rows_run_their_negative_twin_in_the_same_pass(models):
    """Pixels barely show guidance on a random tiny model, so check the velocities: a row with
    guidance > 1 gets the pipeline's rescaled neg + g·(cond − neg), a row with guidance 1 the
    conditional one alone; a subset of the rows (the step cache's) gives the same."""
    images = [_picture(64, 64)]
    with torch.no_grad():
        prompts = [QWEN_EDIT_PLUS.encode_prompt(models, p, images) for p in ("make it blue", "remove it")]
        reference = QWEN_EDIT_PLUS.encode_images(models, images)
        batch = QWEN_EDIT_PLUS.batch(models, prompts, [(reference,), (reference,)], [4.0, 1.0], 64, 64)
        img = torch.randn(2, *reference.shape[1:], generator=torch.Generator().manual_seed(0))
        t = torch.tensor([900.0, 400.0])
        v = QWEN_EDIT_PLUS.velocity(models, batch, img, t)

        def alone(row: int, txt: torch.Tensor) -> torch.Tensor:
            x = torch.cat([img[row : row + 1], reference], dim=1)
            out = models.transformer(hidden_states=x, encoder_hidden_states=txt, timestep=t[row : row + 1] / 1000,
                                     img_shapes=[list(batch.img_shapes)], return_dict=False)[0]
            return out[:, : img.shape[1]]

        cond, neg = alone(0, prompts[0].txt), alone(0, prompts[0].negative)
        guided = neg + 4.0 * (cond - neg)
        guided = guided * cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(v[0:1], guided, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v[1:2], alone(1, prompts[1].txt), atol=1e-5, rtol=1e-4)
        index = torch.tensor([0])
        torch.testing.assert_close(QWEN_EDIT_PLUS.velocity(models, batch.rows(index), img[index], t[index]), v[0:1], atol=1e-5, rtol=1e-4)
    assert (cond - neg).abs().max() > 1e-3  # the negative prompt really is another input


def test_the_original_qwen_image_edit_pipeline_matches_stock_and_takes_one_image(tmp_path, monkeypatch):
    """`QwenImageEditPipeline` (one image, shown to the VL encoder at the VAE's size, no
    "Picture" labels): the same adapter with its template, equal to the stock pipeline; a
    request with a further image is refused before it reaches a batch."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
    from diffusers import QwenImageEditPipeline

    from incontext.engine.families.qwen import QWEN_EDIT
    from incontext.errors import InvalidInput

    directory = tiny_qwen_edit_dir(tmp_path / "qwen_edit", plus=False)
    assert for_directory(directory) is QWEN_EDIT
    reg = Registry(default_id="qwen")
    reg.add(preset_for_directory(directory, id="qwen"))
    r = _request("one", "make the red circle blue", _picture(64, 64), 11, 4.0)
    refused = _request("two", "swap", _picture(64, 64), 1, 4.0, references=(_picture(64, 64, fill=(30, 60, 220)),))
    (ours,), _ = _run(reg, [r])
    engine = LocalEngine(reg, dtype="float32")
    engine.start_thread()
    try:
        with pytest.raises(InvalidInput, match="at most 1 image"):
            engine.submit(refused).result(timeout=600)
    finally:
        engine.stop()
        engine.join(30)

    m = qwen.load(directory, dtype="float32", plus=False)
    processor = qwen_vl_processor(m.image_processor, m.tokenizer)
    pipe = QwenImageEditPipeline.from_pretrained(directory, processor=processor, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    size = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: size(r.width * r.height, ratio))
    ref = pipe(image=r.image, prompt=r.prompt, negative_prompt=qwen.NEGATIVE_PROMPT, true_cfg_scale=4.0, height=64, width=64,
               num_inference_steps=STEPS, generator=torch.Generator().manual_seed(r.seed)).images[0]
    assert _mean_diff(ours.images[0], ref) <= 1.0
    assert np.asarray(ref).std() > 1.0
