"""Whole-image looks and background textures render as exactly what they claim."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from incontext.world.edits import make_example, random_scene
from incontext.world.looks import OUTLINE_PAPER, PIXEL_BLOCKS
from incontext.world.scene import Background, Scene, pattern_mask, render


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_invert_is_the_negative_of_the_same_scene():
    scene = random_scene(random.Random(1), size=(160, 96))
    assert np.array_equal(_pixels(render(replace(scene, look="invert"))), 255 - _pixels(render(scene)))


def test_night_is_darker_and_bluer_and_pastel_lighter_and_softer():
    scene = random_scene(random.Random(2), size=(128, 128))
    plain, night, pastel = (_pixels(render(replace(scene, look=look))) for look in (None, "night", "pastel"))
    assert night.mean() < 0.5 * plain.mean()
    blue_over_red = lambda a: a[..., 2].sum() / max(1, a[..., 0].sum())  # noqa: E731
    assert blue_over_red(night) > blue_over_red(plain)
    chroma = lambda a: (a.max(axis=2) - a.min(axis=2)).mean()  # noqa: E731
    assert pastel.mean() > plain.mean() and chroma(pastel) < chroma(plain)


def test_pixelated_images_are_made_of_flat_blocks():
    scene = random_scene(random.Random(3), size=(128, 128))
    a = _pixels(render(replace(scene, look="pixelate")))
    block = 128 // PIXEL_BLOCKS
    blocks = a.reshape(PIXEL_BLOCKS, block, PIXEL_BLOCKS, block, 3)
    assert (blocks.max(axis=(1, 3)) == blocks.min(axis=(1, 3))).all()


def test_an_outline_draws_shape_edges_but_not_a_gentle_gradient():
    empty = Scene(width=96, height=160, background=Background(rgb=(40, 80, 200), rgb2=(90, 120, 230)))
    assert (_pixels(render(replace(empty, look="outline"))) == OUTLINE_PAPER).all()
    scene = random_scene(random.Random(4), size=(96, 160), n_objects=2)
    lines = _pixels(render(replace(scene, look="outline"))).max(axis=2) < 128
    assert 0 < lines.mean() < 0.2


def test_a_texture_repeats_its_motif_behind_the_objects():
    ex = make_example(random.Random(5), "texture", size=(128, 128))
    motifs = pattern_mask(ex.target_scene)
    assert motifs.mean() > 0.03
    color = np.array(ex.target_scene.background.pattern_rgb)
    shown = np.abs(_pixels(ex.target)[motifs] - color).max(axis=1) <= 2
    assert shown.mean() > 0.6  # the rest is antialiased rims and motifs behind objects
