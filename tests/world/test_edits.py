"""The procedural world: every family makes a real, exact, described edit."""

from __future__ import annotations

import random

import numpy as np
import pytest

from incontext.world.edits import FAMILIES, TRAIN_SIZES, make_example
from incontext.world.language import vocabulary
from incontext.world.scene import COLORS, POSITIONS, SHAPES


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_changes_only_inside_its_mask(family):
    rng = random.Random(family)
    for _ in range(5):
        ex = make_example(rng, family)
        ctx, tgt = np.asarray(ex.context, dtype=int), np.asarray(ex.target, dtype=int)
        assert ex.mask.any(), "the edit changed nothing"
        outside = ~ex.mask
        assert np.abs(ctx - tgt)[outside].max(initial=0) <= 2
        assert ex.instruction and ex.family == family


def test_instructions_use_the_vocabulary_and_vary():
    rng = random.Random(0)
    vocab = set(vocabulary())
    seen = set()
    for _ in range(300):
        ex = make_example(rng)
        words = ex.instruction.split()
        assert all(w in vocab for w in words), ex.instruction
        seen.add(words[0])
    assert len(seen) >= 12  # many verbs and word orders, not one template
    for word in list(COLORS) + list(SHAPES) + ["top", "left", "bottom", "right", "center"]:
        assert word in vocab


def test_recolor_targets_the_named_object_with_the_named_colour():
    rng = random.Random(3)
    ex = make_example(rng, "recolor", size=(128, 128))
    i, color = ex.info["index"], ex.info["color"]
    assert ex.target_scene.objects[i].color == color
    assert ex.instruction.split()[-1] in (color, "one")
    assert tuple(ex.target_scene.objects[i].rgb) == COLORS[color]


def test_add_and_move_use_named_positions():
    rng = random.Random(4)
    for family in ("add", "move"):
        ex = make_example(rng, family)
        o = ex.target_scene.objects[ex.info["index"]]
        assert (o.cx, o.cy) == POSITIONS[ex.info["position"]]


def test_sizes_are_square_and_non_square():
    rng = random.Random(5)
    sizes = {make_example(rng).context.size for _ in range(60)}
    assert sizes <= set(TRAIN_SIZES) and len(sizes) == 3
