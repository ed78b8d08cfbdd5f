"""Preservation: the input's own pixels wherever the model's latents did not move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from incontext import preserve, sampler


def _scene(w: int, h: int, circle=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 236, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((w // 8, h // 8, w // 8 + w // 4, h // 8 + h // 4), fill=circle)
    d.rectangle((w // 2, h // 2, w // 2 + w // 4, h // 2 + h // 4), fill=(40, 160, 140))
    return img


def _change_for_circle(w: int, h: int, scale: int = 8) -> np.ndarray:
    """A change map (latent pixels of `scale` px) that moved where the circle is."""
    change = np.full((h // scale, w // scale), 0.03, dtype=np.float32)
    x0, y0, x1, y1 = w // 8, h // 8, w // 8 + w // 4, h // 8 + h // 4
    change[y0 // scale : (y1 + scale - 1) // scale, x0 // scale : (x1 + scale - 1) // scale] = 1.5
    return change


def _model_output(context: Image.Image) -> Image.Image:
    """What a model returns: the circle recoloured, and every other pixel slightly off (its
    autoencoder), so any kept pixel can only have come from the input."""
    w, h = context.size
    edited = _scene(w, h, circle=(30, 60, 210))
    noise = np.random.default_rng(0).integers(-3, 4, size=(h, w, 3))
    return Image.fromarray(np.clip(np.asarray(edited, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def test_pixels_outside_the_edit_are_the_inputs_and_the_edit_is_the_models():
    context = _scene(128, 128)
    edited = _model_output(context)
    out = preserve.preserve(edited, _change_for_circle(128, 128), context=context)
    res, inp, mask = np.asarray(out.image), np.asarray(context), np.asarray(out.mask)
    assert out.image.size == (128, 128)
    assert np.array_equal(res[mask == 0], inp[mask == 0])
    assert (mask == 0).mean() > 0.8  # the square and the background are untouched
    # the circle's centre is the model's blue (snapped: its median over the circle)
    assert np.abs(res[32, 32].astype(int) - np.asarray(edited)[32, 32]).max() <= 3
    assert res[32, 32, 2] > 150 and res[32, 32, 0] < 80
    assert out.changed_share == pytest.approx(float((res != inp).any(-1).mean()))
    assert 0.02 < out.changed_share < 0.2


def _ring(img: Image.Image, colour=(255, 255, 255)) -> Image.Image:
    """`img` with a ring around the circle's place, as an autoencoder's ringing draws one."""
    w, h = img.size
    out = img.copy()
    ImageDraw.Draw(out).ellipse((w // 8 - 3, h // 8 - 3, w // 8 + w // 4 + 3, h // 8 + h // 4 + 3), outline=colour, width=2)
    return out


def test_a_ring_the_autoencoder_draws_around_an_edit_is_the_inputs_and_the_edit_is_kept():
    """The model's output carries its autoencoder's ring around the recoloured circle, a ring
    its rendering of the input (the context's latents decoded) has too: the ring is the
    input's pixels, the circle still the model's. Without the rendering the ring stays."""
    context = _scene(128, 128)
    edited, rendered = _ring(_model_output(context)), _ring(context)
    ring = (13, 32)  # (x, y): on the ring, left of the circle, inside the band grown around it
    assert tuple(np.asarray(edited)[ring[1], ring[0]]) != tuple(np.asarray(context)[ring[1], ring[0]])
    out = preserve.preserve(edited, _change_for_circle(128, 128), context=context, rendered=rendered)
    res, inp = np.asarray(out.image), np.asarray(context)
    # the input's (the circle's feathered edge may blend a level or two in), not the white ring
    assert np.abs(res[ring[1], ring[0]].astype(int) - inp[ring[1], ring[0]]).max() <= 3
    assert res[32, 32, 2] > 150 and res[32, 32, 0] < 80  # the recoloured circle is the model's
    without = preserve.preserve(edited, _change_for_circle(128, 128), context=context,
                                config=preserve.RegionConfig(snap=False))
    assert np.abs(np.asarray(without.image)[ring[1], ring[0]].astype(int) - inp[ring[1], ring[0]]).max() > 10
    assert out.changed_share < without.changed_share


def test_the_output_is_at_the_sources_size_and_untouched_pixels_are_bit_exact():
    source = _scene(256, 256)
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    out = preserve.preserve(_model_output(context), _change_for_circle(128, 128), context=context, source=source)
    assert out.image.size == out.mask.size == (256, 256)
    res, src, mask = np.asarray(out.image), np.asarray(source), np.asarray(out.mask)
    assert np.array_equal(res[mask == 0], src[mask == 0])
    assert res[64, 64, 2] > 150  # the circle, upscaled from the model's output, is blue


def test_a_non_square_source_keeps_the_margins_the_model_never_saw():
    source = _scene(300, 200)
    w, h = 160, 112
    context = source.resize((w, h), Image.Resampling.LANCZOS, box=_box(source, w, h))
    out = preserve.preserve(_model_output(context), np.zeros((h // 8, w // 8), np.float32), context=context, source=source)
    assert out.image.size == (300, 200)
    assert np.array_equal(np.asarray(out.image), np.asarray(source))
    assert out.changed_share == 0.0


def _box(img: Image.Image, w: int, h: int):
    from incontext import imageio

    return imageio.crop_box(img.width, img.height, w, h)


def test_a_global_change_marks_the_whole_picture():
    context = _scene(128, 128)
    edited = Image.fromarray(255 - np.asarray(context))  # inverted: every latent moved
    out = preserve.preserve(edited, np.full((16, 16), 2.0, np.float32), context=context)
    assert np.array_equal(np.asarray(out.image), np.asarray(edited))
    assert out.changed_share > 0.99


def test_a_subtle_look_over_the_whole_picture_is_not_cut_back_to_the_input():
    # Night as a weak model makes it: every latent moved a little (0.1–0.17 of its RMS, below
    # the local threshold), every pixel 40 levels darker. A local edit's map stays local.
    context = _scene(128, 128)
    edited = Image.fromarray((np.asarray(context) * 0.8).astype(np.uint8))
    subtle = np.random.default_rng(1).uniform(0.10, 0.17, (16, 16)).astype(np.float32)
    out = preserve.preserve(edited, subtle, context=context)
    # Every pixel is the model's, or its flat region's colour fitted to it (snap.py): the same look.
    assert np.abs(np.asarray(out.image).astype(int) - np.asarray(edited)).max() <= 6
    # Where the output matches the autoencoder's rendering (here: the circle, which a blurry
    # autoencoder drew as dark as the edit made it), a global edit still takes the model's.
    rendered = np.asarray(context).copy()
    circle = (slice(16, 48), slice(16, 48))
    rendered[circle] = np.asarray(edited)[circle]
    out = preserve.preserve(edited, subtle, context=context, rendered=Image.fromarray(rendered))
    assert np.abs(np.asarray(out.image).astype(int) - np.asarray(edited)).max() <= 6
    local = preserve.preserve(_model_output(context), _change_for_circle(128, 128), context=context)
    assert (np.asarray(local.mask) == 0).mean() > 0.8


def test_off_returns_the_raw_output_and_still_reports_the_region():
    context = _scene(128, 128)
    edited = _model_output(context)
    out = preserve.preserve(edited, _change_for_circle(128, 128), context=context, mode="off")
    assert np.array_equal(np.asarray(out.image), np.asarray(edited))
    assert 0.02 < (np.asarray(out.mask) > 0).mean() < 0.3
    assert out.changed_share > 0.5  # the autoencoder's noise changed nearly every pixel


def test_an_unknown_mode_is_refused():
    context = _scene(64, 64)
    with pytest.raises(ValueError, match="preserve"):
        preserve.preserve(context, np.zeros((8, 8), np.float32), context=context, mode="sometimes")


def test_multi_turn_keeps_pixels_no_turn_touched_bit_for_bit():
    source = _scene(256, 256)
    image = source
    for _ in range(3):
        context = image.resize((128, 128), Image.Resampling.LANCZOS)
        image = preserve.preserve(_model_output(context), _change_for_circle(128, 128), context=context, source=image).image
    res, src = np.asarray(image), np.asarray(source)
    # the square's interior and the far corner were never in any turn's region
    assert np.array_equal(res[150:180, 150:180], src[150:180, 150:180])
    assert np.array_equal(res[230:, :40], src[230:, :40])


def _left_mask(w: int, h: int, columns: int) -> Image.Image:
    """A client's mask: white (may change) over the first `columns` columns, black elsewhere."""
    mask = np.zeros((h, w), np.uint8)
    mask[:, :columns] = 255
    return Image.fromarray(mask, mode="L")


def test_a_mask_narrows_the_region_to_region_and_mask():
    context = _scene(128, 128)
    edited = _model_output(context)
    change = _change_for_circle(128, 128)
    unmasked = preserve.preserve(edited, change, context=context)
    # The circle spans columns 16–48: a mask of the first 32 columns cuts it in two.
    out = preserve.preserve(edited, change, context=context, mask=_left_mask(128, 128, 32))
    res, inp, region = np.asarray(out.image), np.asarray(context), np.asarray(out.mask)
    assert np.array_equal(res[:, 32:], inp[:, 32:])  # outside the mask, the input's bit for bit
    assert not region[:, 32:].any()
    # Inside it, exactly the region found without a mask: region ∧ mask.
    assert np.array_equal(region[:, :32], np.asarray(unmasked.mask)[:, :32])
    assert np.array_equal(res[:, :32], np.asarray(unmasked.image)[:, :32])
    assert res[32, 24, 2] > 150  # the left part of the circle is the model's blue
    assert out.changed_share == pytest.approx(float((res != inp).any(-1).mean()))
    assert 0 < out.changed_share < unmasked.changed_share


def test_off_with_a_mask_is_the_models_output_inside_and_the_inputs_outside_at_the_sources_size():
    source = _scene(256, 256)
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    edited = _model_output(context)
    # No latent moved: with "off" the mask alone decides where the model's pixels go.
    out = preserve.preserve(edited, np.zeros((16, 16), np.float32), context=context, source=source, mode="off",
                            mask=_left_mask(256, 256, 100))
    assert out.image.size == out.mask.size == (256, 256)
    res, src = np.asarray(out.image), np.asarray(source)
    assert np.array_equal(res[:, 100:], src[:, 100:])
    assert np.array_equal(np.asarray(out.mask) > 0, np.asarray(_left_mask(256, 256, 100)) > 0)
    upscaled = np.asarray(edited.resize((256, 256), Image.Resampling.LANCZOS))
    assert np.array_equal(res[:, :100], upscaled[:, :100])
    assert 0.3 < out.changed_share <= 100 / 256


def test_a_mask_of_the_sources_size_is_fitted_like_the_input_when_the_canvas_is_the_models():
    source = _scene(300, 200)
    w, h = 160, 112
    context = source.resize((w, h), Image.Resampling.LANCZOS, box=_box(source, w, h))
    # The whole source may change but its right third: the canvas (the model's crop) keeps
    # the part of that third it shows.
    out = preserve.preserve(_model_output(context), np.zeros((h // 8, w // 8), np.float32), context=context, mode="off",
                            mask=_left_mask(300, 200, 200))
    fitted = np.asarray(preserve.fit_mask(_left_mask(300, 200, 200), w, h))
    assert out.image.size == (w, h) and 0 < (fitted == 0).mean() < 0.5
    assert np.array_equal(np.asarray(out.image)[fitted == 0], np.asarray(context)[fitted == 0])
    assert np.array_equal(np.asarray(out.mask) > 0, fitted > 0)


def test_change_map_measures_how_far_each_latent_moved():
    torch.manual_seed(0)
    cond = torch.randn(1, 4, 64)  # 32×32 pixels at 8× → a 4×4 latent grid → 2×2 tokens of 2×2 patches × 16 channels
    out = cond.clone()
    out[0, 0] += 5.0  # the first token (a 2×2 patch of latent pixels in the top-left) moved
    change = sampler.change_map(out, cond, 32, 32, 8)
    assert change.shape == (1, 4, 4)
    assert (change[0, :2, :2] > 1.0).all()
    assert change[0, 2:, 2:].max() == 0.0
    unpacked = sampler.unpack(cond, 32, 32, 8)
    assert unpacked.shape == (1, 16, 4, 4)
