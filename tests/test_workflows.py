"""incontext/workflows.py: the edits the workflows plan, the logo placement, the thresholded
segmentation mask and its boxes; and `incontext workflow` running them here on the bundled
nano model."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from incontext import segments, workflows
from incontext.cli import app


def test_the_plans_speak_the_bundled_models_language():
    removal = workflows.plan_object_removal(workflows.ObjectRemovalInput(image_url="i", prompt="the red circle"))
    assert (removal.prompt, removal.images, removal.preserve) == ("remove the red circle", ("i",), "auto")
    assert workflows.plan_object_removal(workflows.ObjectRemovalInput(image_url="i", prompt="blue square")).prompt == "remove the blue square"
    seg = workflows.plan_segmentation(workflows.SegmentationInput(image_url="i", prompt="a red circle"))
    assert (seg.prompt, seg.preserve) == ("make the red circle white and the background black", "off")
    bg = workflows.plan_background_replace(workflows.BackgroundReplaceInput(image_url="i", reference_image_url="r"))
    assert bg.images == ("i", "r") and bg.fields == ("image_url", "reference_image_url") and "second image" in bg.prompt
    logo = workflows.plan_logo_placement(workflows.LogoPlacementInput(image_url="i", logo_image_url="l", mask_url="m"))
    assert logo.mask == "m" and logo.place and "{position}" in logo.prompt


def test_regions_are_the_4_connected_parts_largest_first_without_specks():
    binary = np.zeros((100, 100), bool)
    binary[10:20, 10:30] = True  # 200 pixels
    binary[15:60, 28:31] = True  # joined to it below: one region
    binary[70:90, 70:95] = True  # 500 pixels
    binary[5, 90] = True  # a speck (1 of 10,000 < 1/1000)
    binary[60, 31] = True  # touches the L only at a corner: not 4-connected, and a speck
    assert workflows.regions(binary) == [[70, 70, 95, 90], [10, 10, 31, 60]]
    assert workflows.regions(np.zeros((8, 8), bool)) == []


def test_the_placement_is_the_flattest_spot_and_always_the_same():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)  # detail everywhere…
    pixels[80:, :60] = 128  # …but the bottom left, which is flat
    image = Image.fromarray(pixels)
    box = workflows.placement(image, (40, 20))
    x0, y0, x1, y1 = box
    assert (x1 - x0, y1 - y0) == (40, 20)  # the logo's 2:1 in a quarter of the width
    assert x0 >= 0 and x1 <= 60 and y0 >= 80 and y1 <= 120
    assert workflows.position_name(box, image.size) == "bottom left"
    assert workflows.placement(image, (40, 20)) == box
    # A flat image: every spot ties, and the bottom right goes first.
    assert workflows.position_name(workflows.placement(Image.new("RGB", (160, 120)), (10, 10)), (160, 120)) == "bottom right"


def test_segmentation_thresholds_the_models_picture_onto_the_inputs_framing():
    picture = np.zeros((16, 16), np.uint8)
    picture[4:8, 4:8] = 200  # bright: the thing
    picture[10:12, 10:12] = 120  # grey, below the threshold
    done = workflows.finish("segmentation", Image.fromarray(picture).convert("RGB"), None, source_size=(64, 32))
    mask = np.asarray(done.mask)
    assert done.image is done.mask and mask.shape == (32, 64)
    assert set(np.unique(mask)) == {0, 255}
    # The model saw the centre 32×32 of the 64×32 input: each of its pixels is 2×2 here, 16 columns in.
    assert done.extra["boxes"] == [[16 + 8, 8, 16 + 16, 16]]
    assert not mask[:, :16].any() and not mask[:, 48:].any()


def _disc_scene() -> tuple[Image.Image, np.ndarray]:
    """A vertical-gradient background, a red disc (antialiased rim) and a teal square; the disc's mask."""
    rgb = np.zeros((64, 64, 3), np.float32)
    rgb[...] = np.linspace(200, 240, 64)[:, None, None]
    yy, xx = np.mgrid[0:64, 0:64]
    cover = np.clip(12.5 - np.hypot(yy - 22.5, xx - 22.5), 0, 1)[..., None]  # 1 inside, a 1-pixel blend at the rim
    rgb = rgb * (1 - cover) + np.array([200, 30, 30]) * cover
    rgb[40:56, 40:56] = (20, 150, 150)
    return Image.fromarray(rgb.round().astype(np.uint8)), cover[..., 0] >= 0.5


def test_a_segmentation_mask_snaps_to_the_inputs_edges():
    image, disc = _disc_scene()
    # What an 8x autoencoder gives back: the disc's mask, blocky and a few pixels short of its rim.
    coarse = np.asarray(Image.fromarray(disc).resize((8, 8), Image.Resampling.BOX).resize((64, 64), Image.Resampling.BILINEAR)) > 0
    coarse &= np.hypot(*np.mgrid[0:64, 0:64] - 22.5) < 11
    iou = lambda a: (a & disc).sum() / (a | disc).sum()  # noqa: E731
    assert iou(coarse) < 0.85
    snapped = segments.snap(image, coarse)
    assert iou(snapped) > 0.95 and not snapped[40:56, 40:56].any()
    # finish() snaps when it has the input, and the boxes follow the sharper mask.
    picture = Image.fromarray(np.where(coarse, 255, 0).astype(np.uint8)).convert("RGB")
    done = workflows.finish("segmentation", picture, None, source_size=image.size, source=image)
    assert np.array_equal(np.asarray(done.mask) > 0, snapped) and done.extra["boxes"] == workflows.regions(snapped)


def _flood_labels(rgb: np.ndarray, tolerance: int) -> np.ndarray:
    """Segments by flood fill, pixel by pixel: what `segments.labels` computes a faster way."""
    h, w, _ = rgb.shape
    rgb = rgb.astype(int)
    out = np.full((h, w), -1)
    count = 0
    for y0 in range(h):
        for x0 in range(w):
            if out[y0, x0] >= 0:
                continue
            out[y0, x0], todo = count, [(y0, x0)]
            while todo:
                y, x = todo.pop()
                for qy, qx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= qy < h and 0 <= qx < w and out[qy, qx] < 0 and np.abs(rgb[qy, qx] - rgb[y, x]).max() <= tolerance:
                        out[qy, qx] = count
                        todo.append((qy, qx))
            count += 1
    return out


@pytest.mark.parametrize("seed", range(4))
def test_segments_are_the_4_connected_regions_of_nearly_one_colour(seed):
    rng = np.random.default_rng(seed)
    # Few colours in blocks (so segments wind and merge), and a gentle gradient that stays one segment.
    rgb = (rng.integers(0, 3, (10, 12, 3)) * 40).repeat(3, 0).repeat(2, 1).astype(np.int16)
    rgb += np.arange(24, dtype=np.int16)[None, :, None] * (seed % 2)
    for tolerance in (0, 8, 24):
        assert np.array_equal(segments.labels(Image.fromarray(rgb.astype(np.uint8)), tolerance), _flood_labels(rgb, tolerance))


def test_snapping_leaves_a_mask_alone_where_the_image_has_no_flat_regions():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # every pixel its own segment
    coarse = np.zeros((64, 64), bool)
    coarse[8:30, 8:30] = True
    assert np.array_equal(segments.snap(Image.fromarray(noise), coarse), coarse)
    # A thing without an edge in the image (one flat colour here) keeps its mask but a blurred edge's band.
    flat = segments.snap(Image.new("RGB", (64, 64), (90, 90, 90)), coarse)
    assert np.array_equal(flat, segments.erode(coarse, segments.BAND)) and flat[12:26, 12:26].all()
    # A segment the mask covers in part keeps the mask's pixels.
    half = np.zeros((64, 64), bool)
    half[:, :32] = True
    assert np.array_equal(segments.snap(Image.new("RGB", (64, 64), (90, 90, 90)), half), half)


def test_the_other_workflows_report_the_boxes_of_their_region():
    region = np.zeros((20, 30), np.uint8)
    region[2:5, 3:9] = 128
    image = Image.new("RGB", (30, 20))
    done = workflows.finish("logo-placement", image, Image.fromarray(region), source_size=(30, 20), placement_box=[1, 1, 10, 6])
    assert done.image is image and done.extra == {"boxes": [[3, 2, 9, 5]], "placement": [1, 1, 10, 6]}
    assert workflows.finish("object-removal", image, None, source_size=(30, 20)).extra == {"boxes": []}


def _scene(path):
    pixels = np.full((48, 64, 3), (236, 232, 220), np.uint8)
    pixels[10:30, 8:28] = (200, 30, 30)
    Image.fromarray(pixels).save(path)
    return path


def test_the_cli_runs_a_workflow_here_and_writes_the_image_and_mask(tmp_path):
    src, out, mask = _scene(tmp_path / "in.png"), tmp_path / "out.png", tmp_path / "mask.png"
    r = CliRunner().invoke(app, ["workflow", "segmentation", str(src), "the red square", "-o", str(out), "--mask-out", str(mask),
                                 "--steps", "2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    written = np.asarray(Image.open(mask).convert("L"))
    assert written.shape == (48, 64) and set(np.unique(written)) <= {0, 255}
    assert "boxes:" in r.output


def test_the_cli_logo_placement_picks_and_prints_a_spot_and_keeps_the_rest(tmp_path):
    src, out = _scene(tmp_path / "in.png"), tmp_path / "out.png"
    Image.new("RGB", (20, 10), (250, 210, 20)).save(tmp_path / "logo.png")
    r = CliRunner().invoke(app, ["workflow", "logo-placement", str(src), "--reference", str(tmp_path / "logo.png"), "-o", str(out),
                                 "--steps", "2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    x0, y0, x1, y1 = map(int, re.search(r"placement: \[(\d+), (\d+), (\d+), (\d+)\]", r.output).groups())
    before, after = np.asarray(Image.open(src).convert("RGB")), np.asarray(Image.open(out).convert("RGB"))
    outside = np.ones(before.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(before[outside], after[outside])


@pytest.mark.parametrize("args, says", [(["background-replace"], "--reference"), (["no-such-flow"], "no workflow")])
def test_the_cli_names_what_is_missing(tmp_path, args, says):
    src = _scene(tmp_path / "in.png")
    r = CliRunner().invoke(app, ["workflow", args[0], str(src), "-o", str(tmp_path / "o.png")])
    assert r.exit_code == 1 and says in r.output
