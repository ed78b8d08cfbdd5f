"""incontext.imageio's output sizing: aspect ratios, sizes for a target area, and fitting an
image to a size. Images are built in memory."""

from __future__ import annotations

import pytest
from PIL import Image

from incontext.errors import InvalidInput
from incontext.imageio import ASPECT_RATIOS, fit_to_size, output_size
from incontext.testing import close, two_tone

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ------------------------------------------------------------------------------ sizing

CONTRACT = ["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]


def test_aspect_ratio_table():
    assert set(CONTRACT) <= set(ASPECT_RATIOS)
    assert ASPECT_RATIOS["square_hd"] == ASPECT_RATIOS["square"] == (1, 1)
    assert ASPECT_RATIOS["portrait_4_3"] == (3, 4) and ASPECT_RATIOS["portrait_16_9"] == (9, 16)
    assert ASPECT_RATIOS["landscape_4_3"] == (4, 3) and ASPECT_RATIOS["landscape_16_9"] == (16, 9)
    assert ASPECT_RATIOS["match_input_image"] is None


@pytest.mark.parametrize("target_area", [128 * 128, 1024 * 1024])
@pytest.mark.parametrize("name", [n for n in ASPECT_RATIOS if n != "match_input_image"])
def test_output_size_for_each_ratio(name, target_area):
    rw, rh = ASPECT_RATIOS[name]
    w, h = output_size(640, 480, name, target_area=target_area, multiple=16)
    assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16
    assert abs(w * h / target_area - 1) <= 0.15
    if rw > rh:
        assert w > h
    elif rw < rh:
        assert w < h
    else:
        assert w == h
    tolerance = 0.10 if target_area == 128 * 128 else 0.02  # a coarse grid at nano size
    assert abs((w / h) / (rw / rh) - 1) <= tolerance
    # Portrait sizes are the transposes of the landscape ones.
    if ":" in name:
        a, b = name.split(":")
        assert output_size(640, 480, f"{b}:{a}", target_area=target_area) == (h, w)


def test_known_sizes():
    assert output_size(640, 480, "1:1") == (128, 128)
    assert output_size(640, 480, "1:1", target_area=1024 * 1024) == (1024, 1024)
    assert output_size(640, 480, "16:9", target_area=1024 * 1024) == (1360, 768)


@pytest.mark.parametrize("aspect", [None, "match_input_image", " MATCH_INPUT_IMAGE "])
@pytest.mark.parametrize(("iw", "ih"), [(300, 200), (200, 300), (1920, 1080), (500, 500)])
def test_match_input_keeps_ratio(iw, ih, aspect):
    w, h = output_size(iw, ih, aspect, target_area=1024 * 1024)
    assert w % 16 == 0 and h % 16 == 0
    assert abs((w / h) / (iw / ih) - 1) <= 0.02
    assert abs(w * h / (1024 * 1024) - 1) <= 0.05
    w, h = output_size(iw, ih, aspect)  # nano grid: coarser, but same orientation
    assert (w > h) == (iw > ih) and (w < h) == (iw < ih)


def test_extreme_input_ratio_is_clamped():
    assert output_size(1000, 10, None) == output_size(1000, 10, "21:9")
    assert output_size(10, 1000, "match_input_image") == output_size(10, 1000, "9:21")
    w, h = output_size(1000, 10, None, target_area=1024 * 1024)
    assert 2.2 <= w / h <= 21 / 9 + 0.05


def test_small_target_keeps_sides_at_least_multiple():
    w, h = output_size(1000, 10, "21:9", target_area=16 * 16, multiple=16)
    assert w >= 16 and h >= 16 and w % 16 == 0 and h % 16 == 0
    assert output_size(8, 8, "1:1", target_area=64 * 64, multiple=8) == (64, 64)


@pytest.mark.parametrize("bad", ["5:4", "wide", "", "16x9"])
def test_unknown_aspect_ratio_is_invalid_input(bad):
    with pytest.raises(InvalidInput) as exc:
        output_size(640, 480, bad)
    assert exc.value.code == "INVALID_INPUT"
    assert "16:9" in exc.value.message and "match_input_image" in exc.value.message


def test_output_size_rejects_bad_numbers():
    for args in [(0, 10), (10, -1)]:
        with pytest.raises(InvalidInput):
            output_size(*args, "1:1")
    with pytest.raises(InvalidInput):
        output_size(10, 10, "1:1", multiple=0)
    with pytest.raises(InvalidInput):
        output_size(10, 10, 16)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ fit_to_size


def test_fit_to_size_covers_then_centre_crops():
    src = Image.new("RGB", (300, 100), RED)
    src.paste(GREEN, (100, 0, 200, 100))
    src.paste(BLUE, (200, 0, 300, 100))
    out = fit_to_size(src, 64, 64)  # a square from the middle third
    assert out.size == (64, 64) and out.mode == "RGB"
    assert close(out.getpixel((32, 32)), GREEN, 3)
    assert close(out.getpixel((2, 32)), GREEN, 3) and close(out.getpixel((61, 32)), GREEN, 3)


def test_fit_to_size_tall_and_upscale():
    src = Image.new("RGB", (10, 30), RED)
    src.paste(BLUE, (0, 10, 10, 20))
    out = fit_to_size(src, 40, 40)
    assert out.size == (40, 40)
    assert close(out.getpixel((20, 20)), BLUE, 3)
    assert fit_to_size(src, 10, 30).tobytes() == src.tobytes()


@pytest.mark.parametrize("size", [(16, 16), (1568, 672), (48, 112), (1, 1)])
def test_fit_to_size_exact(size):
    assert fit_to_size(Image.effect_noise((333, 217), 30).convert("RGB"), *size).size == size


def test_fit_to_size_palette_and_bad_args():
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0] + [0] * 765)
    assert fit_to_size(pal, 8, 8).getpixel((4, 4)) == RED
    with pytest.raises(InvalidInput):
        fit_to_size(pal, 0, 8)
    with pytest.raises(InvalidInput):
        fit_to_size("nope", 8, 8)  # type: ignore[arg-type]
