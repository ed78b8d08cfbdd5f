"""incontext/workflows.py: the edits the workflows plan, the logo placement, the thresholded
segmentation mask and its boxes; and `incontext workflow` running them here on the bundled
nano model."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from incontext import regions, segments, workflows
from incontext.cli import app


def test_the_plans_speak_the_bundled_models_language():
    removal = workflows.plan_object_removal(workflows.ObjectRemovalInput(image_url="i", prompt="the red circle"))
    assert (removal.prompt, removal.images, removal.preserve) == ("remove the red circle", ("i",), "auto")
    assert workflows.plan_object_removal(workflows.ObjectRemovalInput(image_url="i", prompt="blue square")).prompt == "remove the blue square"
    seg = workflows.plan_segmentation(workflows.SegmentationInput(image_url="i", prompt="a red circle"))
    assert (seg.prompt, seg.preserve) == ("remove the red circle", "auto")
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
    assert regions.boxes(binary) == [[70, 70, 95, 90], [10, 10, 31, 60]]
    assert regions.boxes(np.zeros((8, 8), bool)) == []


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


def _badge() -> Image.Image:
    """A 40×20 logo: a yellow disc with a black bar on a transparent canvas (the bar reaches the
    canvas's edges, half transparent at its ends)."""
    rgba = np.zeros((20, 40, 4), np.uint8)
    yy, xx = np.mgrid[0:20, 0:40]
    rgba[(yy - 10) ** 2 + (xx - 20) ** 2 < 64] = (250, 210, 20, 255)
    rgba[9:11, 0:40] = (0, 0, 0, 255)
    rgba[9:11, 0] = rgba[9:11, 39] = (0, 0, 0, 128)
    return Image.fromarray(rgba, "RGBA")


def test_the_logo_s_own_pixels_go_in_the_box_and_its_transparency_keeps_the_image():
    image = Image.new("RGB", (100, 80), (30, 90, 160))
    out, landed = workflows.place_logo(image, _badge(), [10, 10, 90, 70])
    pixels = np.asarray(out)
    # Fitted with its 2:1 kept (80 × 40), centred in the 80 × 60 box: rows 20–59.
    assert tuple(pixels[40, 50]) == (0, 0, 0)  # the bar, mid-way
    assert tuple(pixels[30, 50]) == (250, 210, 20)  # the disc above it
    assert tuple(pixels[25, 15]) == (30, 90, 160) and tuple(pixels[15, 50]) == (30, 90, 160)  # transparent: the image's
    assert not landed[25, 15] and landed[30, 50] and not landed[:20].any() and not landed[60:].any()
    assert np.array_equal(pixels[~landed], np.asarray(image)[~landed])
    # The half-transparent end of the bar is half the logo, half the image.
    end = pixels[40, 10]
    assert all(abs(int(v) - c / 2) <= 20 for v, c in zip(end, (30, 90, 160)))


def test_a_logo_never_changes_a_pixel_its_mask_forbids():
    image = Image.new("RGB", (100, 80), (30, 90, 160))
    allowed = np.zeros((80, 100), np.uint8)
    allowed[:, :50] = 255  # only the left half of the box
    out, landed = workflows.place_logo(image, _badge(), [10, 10, 90, 70], Image.fromarray(allowed, "L"))
    assert np.array_equal(np.asarray(out)[:, 50:], np.asarray(image)[:, 50:]) and not landed[:, 50:].any()
    assert tuple(np.asarray(out)[40, 30]) == (0, 0, 0)
    # An opaque logo is a rectangle: it fills its fitted box, the rest stays.
    solid, landed = workflows.place_logo(image, Image.new("RGB", (20, 10), (250, 210, 20)), [0, 0, 100, 80])
    assert landed.sum() == 100 * 50 and landed[15:65].all()
    assert (np.asarray(solid)[15:65] == (250, 210, 20)).all()


def test_a_logo_placement_s_mask_is_where_the_logo_went_and_what_the_model_changed():
    region = np.zeros((80, 100), np.uint8)
    region[0:5, 0:5] = 255  # a change of the model's elsewhere
    done = workflows.finish("logo-placement", Image.new("RGB", (100, 80)), Image.fromarray(region, "L"), source_size=(100, 80),
                            placement_box=[10, 10, 90, 70], logo=_badge())
    mask = np.asarray(done.mask)
    assert mask[40, 50] == 255 and mask[2, 2] == 255 and mask[15, 50] == 0
    assert done.extra["placement"] == [10, 10, 90, 70]
    (x0, y0, x1, y1), model = done.extra["boxes"]
    assert (x0, x1) == (10, 90) and 20 <= y0 < y1 <= 60 and model == [0, 0, 5, 5]  # the bar spans the fitted width


def test_the_backdrop_is_what_has_the_border_s_graded_colour_and_a_subject_on_it_is_not():
    h, w = 60, 80
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([150 + xx * 0.8, 170 + yy * 0.5, 200 - xx * 0.3], -1)  # a studio sweep, graded both ways
    disc = (xx - 30) ** 2 + (yy - 30) ** 2 < 12**2
    pixels[disc] = (200, 30, 30)
    pixels[40:, 60:] = (40, 160, 140)  # a square cut off by the bottom right corner
    mask = workflows.backdrop_mask(Image.fromarray(pixels.astype(np.uint8)))
    backdrop = np.asarray(mask) > 0
    assert set(np.unique(np.asarray(mask))) == {0, 255}
    assert not backdrop[(xx - 30) ** 2 + (yy - 30) ** 2 < 10**2].any() and not backdrop[41:, 61:].any()
    assert backdrop[~disc & ~((yy >= 39) & (xx >= 59))].all()  # the rest, and the subject's rim with it
    assert backdrop[30, 41] and not backdrop[30, 40]  # the disc's outermost pixel (its rim) may change with the backdrop
    rng = np.random.default_rng(0)
    assert workflows.backdrop_mask(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))) is None  # no backdrop


def _disc_scene() -> tuple[Image.Image, np.ndarray]:
    """A vertical-gradient background, a red disc (antialiased rim) and a teal square; the disc's mask."""
    rgb = np.zeros((64, 64, 3), np.float32)
    rgb[...] = np.linspace(200, 240, 64)[:, None, None]
    yy, xx = np.mgrid[0:64, 0:64]
    cover = np.clip(12.5 - np.hypot(yy - 22.5, xx - 22.5), 0, 1)[..., None]  # 1 inside, a 1-pixel blend at the rim
    rgb = rgb * (1 - cover) + np.array([200, 30, 30]) * cover
    rgb[40:56, 40:56] = (20, 150, 150)
    return Image.fromarray(rgb.round().astype(np.uint8)), cover[..., 0] >= 0.5


BLOCK_SHARE = 60  # blocks a quarter covered or more are filled


def _removed_blockily(image: Image.Image, disc: np.ndarray) -> Image.Image:
    """What a model's removal of the disc gives back through an 8x autoencoder: the disc filled
    with the background in 8-pixel blocks (a few rim pixels left red, a corner of background
    repainted a little off), and a speck of redrawn background far from it."""
    pixels = np.asarray(image).copy()
    blocks = np.asarray(Image.fromarray(np.where(disc, 255, 0).astype(np.uint8)).resize((8, 8), Image.Resampling.BOX)) > BLOCK_SHARE
    filled = np.kron(blocks, np.ones((8, 8), bool))
    background = np.linspace(200, 240, 64)[:, None, None] + np.array([6, -4, 2])  # the gradient, a few levels off
    pixels[filled] = np.broadcast_to(background, pixels.shape)[filled].round().astype(np.uint8)
    pixels[2:4, 60:62] = (150, 150, 150)  # the speck
    return Image.fromarray(pixels)


def test_a_segmentation_is_what_removing_the_thing_changed_snapped_to_the_inputs_edges():
    image, disc = _disc_scene()
    output = _removed_blockily(image, disc)
    iou = lambda a: (a & disc).sum() / (a | disc).sum()  # noqa: E731
    changed = np.any(np.abs(np.asarray(output, int) - np.asarray(image, int)) > workflows.CHANGED, -1)
    assert iou(changed) < 0.9  # blocky, short of the rim, over its half-covered pixels, and the speck
    done = workflows.finish("segmentation", output, None, source_size=image.size, source=image)
    mask = np.asarray(done.mask)
    assert done.image is done.mask and mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    assert iou(mask > 0) > 0.98 and not mask[40:56, 40:56].any()
    assert done.extra["boxes"] == regions.boxes(mask > 0) and len(done.extra["boxes"]) == 1  # the speck is not a region
    # Nothing removed, nothing masked; and a segmentation needs its input.
    assert not np.asarray(workflows.finish("segmentation", image, None, source_size=image.size, source=image).mask).any()
    with pytest.raises(ValueError, match="needs the input"):
        workflows.finish("segmentation", output, None, source_size=image.size)


def _two_red_things() -> tuple[Image.Image, Image.Image]:
    """A grey picture with a red square (left) and a red bar (right), and a removal that took both."""
    source = np.full((48, 64, 3), 200, np.uint8)
    source[10:26, 6:22] = (210, 30, 30)
    source[30:36, 36:60] = (210, 30, 30)
    removed = np.full_like(source, 200)
    return Image.fromarray(source), Image.fromarray(removed)


def _drawing(box: tuple[int, int, int, int] | None, size=(64, 48), scale: int = 1) -> workflows.Drawn:
    """A model's drawn mask: white in `box` (a few pixels off the thing), black elsewhere, at size / scale."""
    pixels = np.zeros((size[1] // scale, size[0] // scale), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = (v // scale for v in box)
        pixels[y0:y1, x0:x1] = 230
    return workflows.Drawn(Image.fromarray(pixels).convert("RGB"))


def test_the_model_s_drawn_mask_picks_which_removed_thing_was_meant():
    source, removed = _two_red_things()
    square = np.zeros((48, 64), bool)
    square[10:26, 6:22] = True
    drawn = _drawing((8, 12, 24, 28))  # over most of the square, none of the bar
    seg = workflows.finish("segmentation", removed, None, source_size=source.size, source=source, drawn=drawn)
    assert np.array_equal(np.asarray(seg.mask) > 0, square) and seg.extra["boxes"] == [[6, 10, 22, 26]]
    # The removal keeps the bar, the input's pixels bit for bit, and its mask is the square only.
    model_mask = Image.fromarray(np.where(np.any(np.asarray(removed) != np.asarray(source), -1), 255, 0).astype(np.uint8), "L")
    out = workflows.finish("object-removal", removed, model_mask, source_size=source.size, source=source, drawn=drawn)
    image, mask = np.asarray(out.image), np.asarray(out.mask) > 0
    assert np.array_equal(image[~square], np.asarray(source)[~square]) and (image[square] == 200).all()
    assert np.array_equal(mask, square) and out.extra["boxes"] == [[6, 10, 22, 26]]
    # A drawing at the model's working size (half here) lands on the input the same way.
    small = workflows.finish("segmentation", removed, None, source_size=source.size, source=source, drawn=_drawing((8, 12, 24, 28), scale=2))
    assert np.array_equal(np.asarray(small.mask) > 0, square)
    # A drawing that covers neither says nothing: both stay, as without it.
    for blank in (_drawing(None), _drawing((40, 0, 64, 8))):
        both = workflows.finish("segmentation", removed, None, source_size=source.size, source=source, drawn=blank)
        assert len(both.extra["boxes"]) == 2
        assert np.array_equal(np.asarray(workflows.finish("object-removal", removed, model_mask, source_size=source.size, source=source,
                                                          drawn=blank).image), np.asarray(removed))
    # Both removal workflows plan the drawing, in the bundled model's words for a mask.
    for plan in (workflows.plan_object_removal(workflows.ObjectRemovalInput(image_url="i", prompt="the red square")),
                 workflows.plan_segmentation(workflows.SegmentationInput(image_url="i", prompt="red square"))):
        assert plan.select == "make a mask of the red square"


def test_a_thing_the_selector_picked_is_the_mask_and_all_a_removal_may_change():
    """A selector's pick (at the model's working size, half the input's here) is the thing on the
    input's own edges with its antialiased rim; the removal changes nothing off it, even where
    the model also took the other red thing and shifted the background."""
    from dataclasses import replace as with_

    from incontext.world.scene import COLORS, Background, Scene, Shape, render
    from incontext.world.workflows import visible_mask

    scene = Scene(width=256, height=192, background=Background(rgb=COLORS["gray"], color="gray"), objects=(
        Shape(kind="circle", color="red", rgb=COLORS["red"], cx=0.3, cy=0.4, size=0.14),
        Shape(kind="square", color="red", rgb=COLORS["red"], cx=0.7, cy=0.6, size=0.14)))
    source = render(scene)
    circle = visible_mask(scene, 0)
    took_both = np.asarray(render(with_(scene, objects=(), background=Background(rgb=(120, 124, 120), color="gray"))))
    removed = Image.fromarray(took_both)
    small = Image.fromarray(np.where(circle, 255, 0).astype(np.uint8)).resize((128, 96), Image.Resampling.NEAREST)
    picked = workflows.Drawn(Image.fromarray((np.asarray(small) > 200).astype(np.uint8) * 255).convert("RGB"), picked=True)
    seg = workflows.finish("segmentation", removed, None, source_size=source.size, source=source, drawn=picked)
    got = np.asarray(seg.mask) > 0
    assert (got & circle).sum() / (got | circle).sum() > 0.97 and len(seg.extra["boxes"]) == 1
    model_mask = Image.new("L", source.size, 255)
    near = np.asarray(Image.fromarray(circle).filter(ImageFilter.MaxFilter(2 * workflows.UNDO_MARGIN + 3)))
    # On a plain background, the circle's place takes the plane around it: the input's own grey.
    out = workflows.finish("object-removal", removed, model_mask, source_size=source.size, source=source, drawn=picked)
    image, mask = np.asarray(out.image), np.asarray(out.mask) > 0
    assert np.array_equal(image[~near], np.asarray(source)[~near])  # the square and the background: the input's, bit for bit
    assert (image[near] == COLORS["gray"]).all()  # the circle, its rim and the margin: the background behind it
    assert not (mask & ~near).any() and mask[circle].all()
    # On a background no plane fits (noise), the model's fill is kept on the thing and nowhere else.
    noisy = np.asarray(source).astype(np.int16)
    away = ~np.asarray(Image.fromarray(visible_mask(scene, 0) | visible_mask(scene, 1)).filter(ImageFilter.MaxFilter(5)))
    noisy[away] += np.random.default_rng(0).integers(-20, 21, noisy[away].shape, dtype=np.int16)
    noisy = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    out = workflows.finish("object-removal", removed, model_mask, source_size=source.size, source=noisy, drawn=picked)
    image, mask = np.asarray(out.image), np.asarray(out.mask) > 0
    assert np.array_equal(image[~near], np.asarray(noisy)[~near]) and np.array_equal(image[circle], took_both[circle])
    assert not (mask & ~near).any() and mask[circle].all()
    # A pick of nothing, or a drawing by the model, leaves the removal's regions to decide.
    empty = workflows.Drawn(Image.new("RGB", (128, 96)), picked=True)
    assert workflows.picked_thing(empty, source) is None and workflows.picked_thing(with_(picked, picked=False), source) is None


def test_a_segmentation_of_a_cropped_input_lands_on_the_inputs_framing():
    # The model saw the centre 32×32 of a 64×32 input; its output is at that working size.
    source = Image.new("RGB", (64, 32), (200, 200, 200))
    source.paste((30, 30, 200), (16 + 8, 8, 16 + 16, 16))  # a blue square in the seen part
    output = source.crop((16, 0, 48, 32)).copy()
    output.paste((200, 200, 200), (8, 8, 16, 16))  # removed
    mask = np.asarray(workflows.finish("segmentation", output, None, source_size=source.size, source=source).mask) > 0
    assert mask.shape == (32, 64) and mask[8:16, 24:32].all() and mask.sum() == 64


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
    # The logo's own pixels fill its box (an opaque logo is a rectangle), whatever the model drew.
    assert (after[y0:y1, x0:x1] == (250, 210, 20)).all()


def test_the_cli_lays_a_transparent_logo_in_the_mask_s_box(tmp_path):
    src, out, mask = _scene(tmp_path / "in.png"), tmp_path / "out.png", tmp_path / "mask.png"
    _badge().save(tmp_path / "logo.png")
    where = np.zeros((48, 64), np.uint8)
    where[30:46, 32:64] = 255
    Image.fromarray(where, "L").save(mask)
    r = CliRunner().invoke(app, ["workflow", "logo-placement", str(src), "--reference", str(tmp_path / "logo.png"), "--mask", str(mask),
                                 "-o", str(out), "--steps", "2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    after, before = np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(src).convert("RGB"))
    assert "placement: [32, 30, 64, 46]" in r.output
    assert tuple(after[38, 48]) == (0, 0, 0) and tuple(after[34, 48]) == (250, 210, 20)  # bar and disc, in a 32 × 16 box
    assert np.array_equal(after[where == 0], before[where == 0])


@pytest.mark.parametrize("args, says", [(["background-replace"], "--reference"), (["no-such-flow"], "no workflow")])
def test_the_cli_names_what_is_missing(tmp_path, args, says):
    src = _scene(tmp_path / "in.png")
    r = CliRunner().invoke(app, ["workflow", args[0], str(src), "-o", str(tmp_path / "o.png")])
    assert r.exit_code == 1 and says in r.output


def test_the_bundled_model_segments_the_red_circle_of_the_readme_picture(tmp_path):
    """`incontext workflow segmentation examples/shapes.png "the red circle"` at the defaults:
    the mask is the circle, nothing else."""
    from pathlib import Path

    picture = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
    source = np.asarray(Image.open(picture).convert("RGB"), np.int32)
    # The picture's four colours, from the circle's, the background's, the triangle's and the
    # square's insides; the circle's pixels are those nearest its red.
    colours = [source[90, 80], source[5, 5], source[200, 100], source[170, 180]]
    circle = np.argmin([np.abs(source - c).sum(-1) for c in colours], axis=0) == 0
    mask_path = tmp_path / "mask.png"
    r = CliRunner().invoke(app, ["workflow", "segmentation", str(picture), "the red circle", "-o", str(tmp_path / "out.png"),
                                 "--mask-out", str(mask_path), "--seed", "0"])
    assert r.exit_code == 0, r.output
    mask = np.asarray(Image.open(mask_path).convert("L")) > 0
    assert (mask & circle).sum() / (mask | circle).sum() > 0.95


class _Engine:
    """An engine whose mask requests come back at once, picked or drawn, and whose edits wait
    to be cancelled or released."""

    def __init__(self, picked: bool):
        import asyncio

        self.picked, self.cancelled, self.release = picked, [], asyncio.Event()

    async def edit(self, request, on_progress=None):
        from incontext.engine.protocol import EditResult
        from incontext.errors import Cancelled

        if request.thing_mask:
            return EditResult([Image.new("RGB", (8, 8), "white")], [request.seed], 0, selected=self.picked)
        await self.release.wait()
        if request.request_id in self.cancelled:
            raise Cancelled("cancelled")
        return EditResult([Image.new("RGB", (8, 8), "red")], [request.seed], 4)

    def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.release.set()
        return True


@pytest.mark.parametrize("picked", [True, False])
def test_a_segmentation_whose_thing_the_selector_picked_needs_no_removal(picked):
    """With mask_answers (segmentation), a picked mask ends the pair: the removal is cancelled
    and the mask is the answer. A drawn mask waits for the removal, which then decides."""
    import asyncio

    from incontext.engine.protocol import EditRequest

    async def go():
        engine = _Engine(picked)
        request = EditRequest("run", "m", "remove the red circle", Image.new("RGB", (8, 8)), 8, 8, 3)
        call = asyncio.ensure_future(workflows.edit_with_select(engine, request, "make a mask of the red circle", mask_answers=True))
        await asyncio.sleep(0.05)
        if not picked:
            assert not call.done()  # waiting for the removal
            engine.release.set()
        result, drawn = await asyncio.wait_for(call, 5)
        return engine, result, drawn

    engine, result, drawn = asyncio.run(go())
    assert drawn.picked is picked
    if picked:
        assert engine.cancelled == ["run"] and result.selected and result.num_inference_steps == 0
    else:
        assert engine.cancelled == [] and result.num_inference_steps == 4


def test_the_background_behind_a_thing_on_a_gradient_is_the_gradient():
    from incontext import outline

    yy, xx = np.mgrid[0:96, 0:128]
    ramp = np.stack([60 + xx, 100 + yy // 2, 200 - xx // 2], axis=-1).astype(np.uint8)  # a linear gradient per channel
    source = ramp.copy()
    thing = (yy - 40) ** 2 + (xx - 50) ** 2 <= 15**2
    source[thing] = (220, 40, 40)
    image, region = outline.fill_behind(Image.fromarray(source), thing, 2)
    assert region[thing].all() and not region[(yy - 40) ** 2 + (xx - 50) ** 2 > 18**2].any()
    assert np.abs(np.asarray(image).astype(int) - ramp.astype(int)).max() <= 1
