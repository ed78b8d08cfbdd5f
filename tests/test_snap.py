"""Snapping an edit to the input's flat regions: what the model recoloured comes back crisp, in
the input's own outline, and what it drew new is kept."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from incontext import preserve

BEIGE, RED, BLUE, TEAL, YELLOW = (240, 236, 225), (200, 30, 30), (30, 60, 210), (40, 160, 140), (230, 200, 40)
CIRCLE = (32, 32, 96, 96)


def _drawing(circle=RED) -> Image.Image:
    img = Image.new("RGB", (256, 256), BEIGE)
    d = ImageDraw.Draw(img)
    d.ellipse(CIRCLE, fill=circle)
    d.rectangle((150, 150, 210, 210), fill=TEAL)
    return img


def _blurred(img: Image.Image) -> Image.Image:
    """An autoencoder's rendering at the model's 128²: soft edges, a few levels off everywhere."""
    small = img.resize((128, 128), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1.5))
    noise = np.random.default_rng(0).integers(-3, 4, size=(128, 128, 3))
    return Image.fromarray(np.clip(np.asarray(small, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def _blob_output() -> Image.Image:
    """The model's recolour: a blue blob, off the circle's outline by a few pixels and soft."""
    img = _drawing()
    d = ImageDraw.Draw(img)
    d.ellipse(CIRCLE, fill=BEIGE)
    d.ellipse((38, 26, 100, 92), fill=BLUE)  # shifted and squashed
    return _blurred(img)


def _change(cells: list[tuple[int, int, int, int]]) -> np.ndarray:
    """A 16×16 change map (the model's 128² in 8-pixel latents) that moved in the given boxes of a 256² canvas."""
    change = np.full((16, 16), 0.03, dtype=np.float32)
    for x0, y0, x1, y1 in cells:
        change[y0 // 16 : (y1 + 15) // 16, x0 // 16 : (x1 + 15) // 16] = 1.5
    return change


def _circle_mask() -> np.ndarray:
    m = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(m).ellipse(CIRCLE, fill=255)
    return np.asarray(m) == 255


def test_a_recoloured_circle_comes_back_in_its_own_outline():
    source = _drawing()
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    out = preserve.preserve(_blob_output(), _change([(24, 16, 104, 104)]), context=context, source=source)
    res, inp = np.asarray(out.image).astype(int), np.asarray(source).astype(int)
    inside, outside = _circle_mask(), ~_circle_mask()
    # Every pixel of the circle (but its antialiased rim) is one blue: no blob, no red left.
    core = np.asarray(Image.fromarray(inside).filter(ImageFilter.MinFilter(5))) > 0
    colours = res[core]
    assert np.abs(colours - colours[0]).max() <= 2
    assert colours[0][2] > 150 and colours[0][0] < 80
    # Outside it the input comes back bit for bit: the blob's spill onto the background is gone.
    ring = np.asarray(Image.fromarray(inside).filter(ImageFilter.MaxFilter(5))) > 0
    assert np.array_equal(res[~ring], inp[~ring])


def test_the_raw_blob_is_what_snapping_removes():
    source = _drawing()
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    unsnapped = preserve.preserve(_blob_output(), _change([(24, 16, 104, 104)]), context=context, source=source,
                                  config=preserve.RegionConfig(snap=False))
    res, inp = np.asarray(unsnapped.image).astype(int), np.asarray(source).astype(int)
    ring = np.asarray(Image.fromarray(_circle_mask()).filter(ImageFilter.MaxFilter(5))) > 0
    assert not np.array_equal(res[~ring], inp[~ring])  # without it the spill stays


def test_something_new_keeps_the_models_pixels():
    source = _drawing()
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    drawn = _drawing()
    ImageDraw.Draw(drawn).regular_polygon((200, 60, 24), 3, fill=YELLOW)  # an added triangle, away from everything
    out = preserve.preserve(_blurred(drawn), _change([(170, 30, 230, 90)]), context=context, source=source)
    res = np.asarray(out.image).astype(int)
    assert np.abs(res[62, 200] - YELLOW).max() < 30
    assert out.changed_share > 0.005


def test_a_photograph_is_composed_as_before():
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8))
    edited = Image.fromarray(np.clip(np.asarray(photo, dtype=np.int16) + 60, 0, 255).astype(np.uint8))
    change = np.full((16, 16), 0.03, dtype=np.float32)
    change[2:6, 2:6] = 1.5
    snapped = preserve.preserve(edited, change, context=photo)
    plain = preserve.preserve(edited, change, context=photo, config=preserve.RegionConfig(snap=False))
    assert np.array_equal(np.asarray(snapped.image), np.asarray(plain.image))


def test_a_removed_object_becomes_the_gradient_behind_it_without_a_ghost():
    rows = np.linspace(90, 200, 256)[:, None, None] * np.ones((1, 256, 1))
    gradient = np.concatenate([rows, rows * 0.8, 255 - rows], axis=2).astype(np.uint8)  # a vertical gradient
    behind = Image.fromarray(gradient)
    source = behind.copy()
    ImageDraw.Draw(source).ellipse(CIRCLE, fill=RED)
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    # The model removes the circle, but fills its place a little off the background (a ghost).
    ghost = np.asarray(behind, dtype=np.int16).copy()
    ghost[_circle_mask()] += 14
    edited = _blurred(Image.fromarray(np.clip(ghost, 0, 255).astype(np.uint8)))
    out = preserve.preserve(edited, _change([(24, 24, 104, 104)]), context=context, source=source)
    res = np.asarray(out.image).astype(int)
    assert np.abs(res[_circle_mask()] - gradient[_circle_mask()]).max() <= 3
    unsnapped = preserve.preserve(edited, _change([(24, 24, 104, 104)]), context=context, source=source,
                                  config=preserve.RegionConfig(snap=False))
    assert np.abs(np.asarray(unsnapped.image).astype(int)[_circle_mask()] - gradient[_circle_mask()]).max() > 8


def test_an_outline_style_keeps_its_lines_and_whitens_the_insides():
    """Every segment repainted: the background and the square's inside white, dark lines on
    the square's edge. The inside is wholly the background's new colour, which is no blur.
    (A line the autoencoder blurs to less than half-way from the new colour back to the old
    is taken for an uneven recolour and goes: lines here are 3 model pixels wide.)"""
    source = Image.new("RGB", (256, 256), (130, 130, 120))
    ImageDraw.Draw(source).rectangle((100, 100, 160, 160), fill=(40, 20, 20))
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    drawn = Image.new("RGB", (256, 256), (250, 250, 250))
    ImageDraw.Draw(drawn).rectangle((100, 100, 160, 160), outline=(30, 30, 30), width=6)
    out = preserve.preserve(_blurred(drawn), np.full((16, 16), 1.2, np.float32), context=context, source=source)
    res = np.asarray(out.image).astype(int)
    assert res[130, 130].min() > 200  # the square's inside is white paper
    assert res[102, 130].max() < 120 and res[130, 102].max() < 120  # its edges are dark lines
    assert res[40, 40].min() > 200  # and so is the background


def test_a_fleck_of_the_old_colour_beside_a_recolour_goes():
    """The model recolours the circle but leaves, just outside its edge, a pale fleck of the old
    red half blended into the background (as nano did on the README example): nothing new was
    asked for there, so the input's pixels come back."""
    source = _drawing()
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    drawn = _drawing(circle=BLUE)
    pink = tuple((np.array(BEIGE) * 0.55 + np.array(RED) * 0.45).astype(int))
    ImageDraw.Draw(drawn).ellipse((52, 22, 76, 34), fill=pink)  # above the circle's top, touching it
    out = preserve.preserve(_blurred(drawn), _change([(24, 16, 104, 104)]), context=context, source=source)
    res, inp = np.asarray(out.image).astype(int), np.asarray(source).astype(int)
    ring = np.asarray(Image.fromarray(_circle_mask()).filter(ImageFilter.MaxFilter(5))) > 0
    assert np.array_equal(res[~ring], inp[~ring])
    assert res[64, 64][2] > 150 and res[64, 64][0] < 80  # and the circle is blue


def test_an_object_moved_beside_its_old_place_is_kept():
    """A move: the circle's old place becomes background and the circle is drawn again just
    right of it, in its own red. The red there is new, not the old colour's residue."""
    source = _drawing()
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    drawn = Image.new("RGB", (256, 256), BEIGE)
    d = ImageDraw.Draw(drawn)
    d.ellipse((100, 32, 164, 96), fill=RED)  # moved 68 pixels right: its edge 4 pixels from the old one
    d.rectangle((150, 150, 210, 210), fill=TEAL)
    out = preserve.preserve(_blurred(drawn), _change([(24, 16, 176, 104)]), context=context, source=source)
    res = np.asarray(out.image).astype(int)
    assert np.abs(res[64, 106] - RED).max() < 40  # the moved circle's left edge, within reach of the old place
    assert np.abs(res[64, 132] - RED).max() < 40
    assert np.abs(res[64, 64] - BEIGE).max() < 20  # and the old place is background


def _antialiased(circle) -> Image.Image:
    """_drawing, rendered 4× larger and scaled down: the circle's edge is a ring of blends."""
    big = Image.new("RGB", (1024, 1024), BEIGE)
    d = ImageDraw.Draw(big)
    d.ellipse(tuple(4 * v for v in CIRCLE), fill=circle)
    d.rectangle((600, 600, 840, 840), fill=TEAL)
    return big.resize((256, 256), Image.Resampling.BOX)


def test_a_recoloured_circle_keeps_its_antialiased_edge():
    """The input's circle has a soft edge (blends of red and beige). Recoloured, that edge is the
    same blends of blue and beige: the output is the input drawn with a blue circle, to a few
    levels, rim included, although the model's blob is off the outline and blurred."""
    source, expected = _antialiased(RED), _antialiased(BLUE)
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    out = preserve.preserve(_blob_output(), _change([(24, 16, 104, 104)]), context=context, source=source)
    res, want = np.asarray(out.image).astype(int), np.asarray(expected).astype(int)
    rim = (np.abs(np.asarray(source).astype(int) - BEIGE).max(-1) > 8) & (np.abs(np.asarray(source).astype(int) - RED).max(-1) > 8)
    rim[140:, 140:] = False  # the square's edge is not the circle's
    assert rim.sum() > 100
    assert np.abs(res[rim] - want[rim]).max() <= 4
    assert np.abs(res - want).max() <= 4


def test_a_removed_antialiased_circle_leaves_the_background_exactly():
    """The circle removed: its place and its soft edge are the background again, to the level,
    not the model's redrawing of it (a few levels off, in the autoencoder's noise)."""
    source = _antialiased(RED)
    behind = _antialiased(BEIGE)  # the same picture without the circle
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    out = preserve.preserve(_blurred(behind), _change([(24, 16, 104, 104)]), context=context, source=source)
    res, want = np.asarray(out.image).astype(int), np.asarray(behind).astype(int)
    assert np.abs(res - want).max() <= 1


def test_a_removed_antialiased_circle_filled_a_little_off_leaves_no_ghost():
    """The model removes the circle but fills its place 10 levels off the background. Its
    surroundings are read past the circle's soft edge (a ring of red–beige blends), so they are
    one flat beige and the place takes it: no ghost of the circle is left."""
    source = _antialiased(RED)
    behind = _antialiased(BEIGE)
    ghost = np.asarray(behind, dtype=np.int16).copy()
    ghost[_circle_mask()] -= 10
    edited = _blurred(Image.fromarray(np.clip(ghost, 0, 255).astype(np.uint8)))
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    out = preserve.preserve(edited, _change([(24, 16, 104, 104)]), context=context, source=source)
    res, want = np.asarray(out.image).astype(int), np.asarray(behind).astype(int)
    assert np.abs(res - want)[_circle_mask()].max() <= 1


def _new_background(square_now) -> Image.Image:
    """The model's "make the background brown": the background brown, the teal square drawn `square_now`."""
    brown = (130, 80, 40)
    img = Image.new("RGB", (256, 256), brown)
    d = ImageDraw.Draw(img)
    d.ellipse(CIRCLE, fill=RED)
    d.rectangle((150, 150, 210, 210), fill=square_now)
    return _blurred(img)


def test_a_new_backgrounds_tint_on_an_object_goes():
    # The autoencoder blurs a new background into the objects on it: the teal square comes back
    # a third of the way to brown. It was not asked to change, so it keeps the input's pixels.
    source = _drawing()
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    tinted = tuple(round(t + (b - t) / 3) for t, b in zip(TEAL, (130, 80, 40)))
    out = preserve.preserve(_new_background(tinted), np.full((16, 16), 1.5, np.float32), context=context, source=source)
    res, inp = np.asarray(out.image).astype(int), np.asarray(source).astype(int)
    square = (slice(156, 205), slice(156, 205))  # its inside, off the antialiased edge
    assert (res[square] == inp[square]).all()
    assert np.abs(res[5:20, 5:20] - (130, 80, 40)).max() <= 8  # the background did change


def test_an_object_recoloured_with_the_background_takes_its_new_colour():
    source = _drawing()
    context = source.resize((128, 128), Image.Resampling.LANCZOS)
    out = preserve.preserve(_new_background(YELLOW), np.full((16, 16), 1.5, np.float32), context=context, source=source)
    res = np.asarray(out.image).astype(int)
    assert np.abs(res[156:205, 156:205] - YELLOW).max() <= 8


def test_a_one_pixel_segment_the_model_barely_touched_stays_the_inputs():
    # A triangle's antialiased tip can be a segment of one pixel. Refitted, its "colour map" was
    # whatever the model drew there; it is the input's, as the pixels around it are.
    from incontext import snap

    base = np.full((64, 64, 3), BEIGE, np.uint8)
    base[10:30, 10:30] = RED
    base[50, 50] = (240, 200, 170)  # the tip: a segment of its own
    edited = base.copy()
    edited[10:30, 10:30] = BLUE  # the recolour asked for
    edited[50, 50] = (240, 224, 200)  # the model drew the tip a little nearer the background
    alpha = np.zeros((64, 64), np.float32)
    alpha[6:34, 6:34] = 1.0
    alpha[48:53, 48:53] = 0.5  # the feathered edge of the region reaches it
    out, _ = snap.snap_edit(base, edited, alpha)
    assert out[50, 50].tolist() == [240, 200, 170]
    assert out[20, 20].tolist() == list(BLUE)
