"""The procedural world: every family makes a real, exact, described edit."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from incontext.world.character import BESIDE_GAP, BESIDE_SIZE
from incontext.world.edits import FAMILIES, TRAIN_SIZES, make_example
from incontext.world.language import COLOR_SYNONYMS, SHAPE_SYNONYMS, vocabulary
from incontext.world.scene import COLORS, POSITIONS, SHAPES, creature_masks, object_mask, word_mask


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


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_words_its_instructions_in_the_bundled_vocabulary(family):
    # The bundled tokenizer maps any other word to <unk>; tests/world/test_stability.py pins the vocabulary.
    rng = random.Random(f"vocab:{family}")
    vocab = set(vocabulary())
    instructions = {make_example(rng, family, size=(128, 128)).instruction for _ in range(40)}
    assert all(w in vocab for text in instructions for w in text.split()), instructions
    assert len(instructions) >= 8  # synonyms and word orders, not one sentence


def test_resize_changes_only_the_size_in_the_direction_it_says():
    rng = random.Random(6)
    for _ in range(10):
        ex = make_example(rng, "resize")
        i = ex.info["index"]
        before, after = ex.scene.objects[i], ex.target_scene.objects[i]
        assert replace(after, size=before.size) == before
        assert (after.size > before.size) == ex.info["bigger"]
        assert ("smaller" in ex.instruction) != ex.info["bigger"]


def test_replace_keeps_place_and_size_and_names_the_new_shape():
    rng = random.Random(7)
    for _ in range(10):
        ex = make_example(rng, "replace")
        i = ex.info["index"]
        before, after = ex.scene.objects[i], ex.target_scene.objects[i]
        assert (after.cx, after.cy, after.size) == (before.cx, before.cy, before.size)
        assert after.kind == ex.info["kind"] != before.kind
        assert ex.instruction.split()[-1] == after.kind or after.kind in ex.instruction.split()[-3:]


def test_text_is_written_inside_the_image_and_edited_as_said():
    rng = random.Random(8)
    for size in TRAIN_SIZES * 3:
        ex = make_example(rng, "text", size=size)
        before, after = ex.scene.words[0], ex.target_scene.words[0]
        letters = word_mask(ex.target_scene, 0)
        assert letters.sum() > 40 and not (letters[0].any() or letters[-1].any() or letters[:, 0].any() or letters[:, -1].any())
        if ex.info["edit"] == "color":
            assert after == replace(before, color=ex.info["color"], rgb=COLORS[ex.info["color"]])
            assert ex.info["color"] in ex.instruction.split()
        else:
            assert after == replace(before, text=ex.info["word"]) and after.text != before.text
            assert after.text in ex.instruction.split()


def test_the_creature_keeps_every_trait_and_goes_where_it_is_told():
    rng = random.Random(9)
    for _ in range(12):
        ex = make_example(rng, "creature")
        before, after = ex.scene.creature, ex.target_scene.creature
        assert replace(after, cx=before.cx, cy=before.cy) == before
        said = [f"{color} " for color in _names(before.color, COLOR_SYNONYMS)] + [" it "]  # "crimson" is red
        assert any(word in f" {ex.instruction} " for word in said), ex.instruction
        if "position" in ex.info:
            assert (after.cx, after.cy) == POSITIONS[ex.info["position"]]
        if "color" in ex.info:
            assert ex.target_scene.background.color == ex.info["color"] != ex.scene.background.color
        assert set(ex.info) - {"how"}


def test_shapes_put_beside_the_creature_sit_next_to_it_as_named_without_touching_anything():
    rng = random.Random(10)
    beside = [ex for ex in (make_example(rng, "creature") for _ in range(40)) if ex.info["how"] == "beside"]
    assert len(beside) >= 5 and {len(ex.info["added"]) for ex in beside} == {1, 2}
    for ex in beside:
        assert ex.target_scene.creature == ex.scene.creature  # it does not move to make room
        assert ex.target_scene.objects[: len(ex.scene.objects)] == ex.scene.objects
        side = min(ex.scene.width, ex.scene.height)
        creature = _pixels(np.logical_or.reduce(list(creature_masks(ex.scene).values())))
        others = [_pixels(object_mask(ex.target_scene, i)) for i in range(len(ex.target_scene.objects))]
        for i in ex.info["added"]:
            o = ex.target_scene.objects[i]
            assert any(f"{color} {kind}" in ex.instruction for color in _names(o.color, COLOR_SYNONYMS)
                       for kind in _names(o.kind, SHAPE_SYNONYMS)), ex.instruction
            shape = object_mask(ex.target_scene, i)
            assert not (shape[0].any() or shape[-1].any() or shape[:, 0].any() or shape[:, -1].any())
            assert BESIDE_GAP * side - 1 <= _distance(others[i], creature) <= 2 * BESIDE_SIZE * side
            assert all(_distance(others[i], p) >= BESIDE_GAP * side - 1 for j, p in enumerate(others) if j != i)


def _names(name: str, synonyms: dict[str, str]) -> list[str]:
    return [name] + [word for word, meaning in synonyms.items() if meaning == name]


def _pixels(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.stack([xs, ys], axis=1).astype(float)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """Between the nearest two pixels of two sets, from centre to centre."""
    return float(np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)).min())


def test_sizes_are_square_and_non_square():
    rng = random.Random(5)
    sizes = {make_example(rng).context.size for _ in range(60)}
    assert sizes <= set(TRAIN_SIZES) and len(sizes) == 3


def test_confusable_scenes_make_the_named_object_need_both_its_words():
    # Two objects alike in one word, every object still named uniquely by colour and kind,
    # and the edit still exact: in most dressed scenes the object the edit names has a twin.
    rng = random.Random(7)
    twins = 0
    for _ in range(60):
        ex = make_example(rng, "remove", confusable_share=1.0)
        objs = ex.scene.objects
        assert len({(o.color, o.kind) for o in objs}) == len(objs)
        named = objs[ex.info["index"]]
        assert f"{named.color} " in ex.instruction or any(syn in ex.instruction for syn in COLOR_SYNONYMS)
        twins += any((o.color == named.color) != (o.kind == named.kind) for o in objs if o is not named)
        assert np.abs(np.asarray(ex.context, int) - np.asarray(ex.target, int))[~ex.mask].max(initial=0) <= 2
    assert twins >= 40  # the plain draw gives a twin in 25 of these 60
    # The world's own draw (what the benchmark holds out) is unchanged without the option.
    plain = [make_example(random.Random(3), "remove").instruction for _ in range(2)]
    assert plain[0] == plain[1] == make_example(random.Random(3), "remove", confusable_share=0.0).instruction
