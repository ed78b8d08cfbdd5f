"""The checks on exact answers: the ground truth always succeeds, the unchanged input never does."""

import math
from dataclasses import replace
from functools import cache
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from incontext.bench import checks
from incontext.bench.heldout import visible
from incontext.world import character, edits
from incontext.world.looks import LOOKS
from incontext.world.scene import COLORS, SHAPES, Scene, distinct, render


@cache
def _examples(family: str, n: int = 12) -> tuple[edits.Example, ...]:
    rng = random.Random(f"test-checks:{family}")  # not the held-out stream: the checks must hold on any draw
    out = []
    while len(out) < n:
        ex = edits.make_example(rng, family)
        if visible(ex):
            out.append(ex)
    return tuple(out)


def test_every_world_family_has_a_check():
    assert set(edits.FAMILIES) <= set(checks.CHECKS)


@pytest.mark.parametrize("family", edits.FAMILIES)
def test_ground_truth_succeeds(family):
    for ex in _examples(family):
        assert checks.success(ex, ex.target), ex.instruction


@pytest.mark.parametrize("family", edits.FAMILIES)
def test_unchanged_input_fails(family):
    for ex in _examples(family):
        assert not checks.success(ex, ex.context), ex.instruction
        assert not checks.verdict(ex, ex.context).changed, ex.instruction  # failed for the right reason


@pytest.mark.parametrize("family", edits.FAMILIES)
def test_a_slightly_blurred_target_still_succeeds(family):
    # A model's output goes through an autoencoder: soft edges must not count as failure.
    for ex in _examples(family)[:6]:
        assert checks.success(ex, ex.target.filter(ImageFilter.GaussianBlur(1))), ex.instruction


def test_recolor_to_the_wrong_colour_fails():
    for ex in _examples("recolor")[:6]:
        wrong = next(c for c in COLORS if c not in (ex.info["color"], ex.scene.background.color))
        i = ex.info["index"]
        obj = ex.target_scene.objects[i]
        scene = ex.target_scene.with_object(i, replace(obj, color=wrong, rgb=COLORS[wrong]))
        assert not checks.success(ex, render(scene)), ex.instruction


def test_resizing_the_wrong_way_fails():
    for ex in _examples("resize")[:6]:
        i = ex.info["index"]
        obj = ex.scene.objects[i]
        wrong = obj.size / ex.info["factor"]  # smaller when asked for bigger, and the reverse
        assert not checks.success(ex, render(ex.scene.with_object(i, replace(obj, size=wrong)))), ex.instruction


def test_replacing_with_the_wrong_shape_fails():
    for ex in _examples("replace")[:6]:
        i = ex.info["index"]
        obj = ex.target_scene.objects[i]
        wrong = next(k for k in SHAPES if k not in (ex.info["kind"], ex.scene.objects[i].kind))
        assert not checks.success(ex, render(ex.target_scene.with_object(i, replace(obj, kind=wrong)))), ex.instruction


@pytest.mark.parametrize("family", LOOKS)
def test_another_look_than_the_one_asked_fails(family):
    for ex in _examples(family)[:4]:
        for other in LOOKS:
            if other != family:
                assert not checks.success(ex, render(replace(ex.target_scene, look=other))), (ex.instruction, other)


def test_blurring_is_not_pixelating():
    for ex in _examples("pixelate")[:6]:
        assert not checks.success(ex, ex.context.filter(ImageFilter.GaussianBlur(2))), ex.instruction


def test_a_texture_of_the_wrong_colour_fails():
    for ex in _examples("texture")[:6]:
        bg = ex.target_scene.background
        wrong = next(c for c in COLORS if c not in (bg.color, bg.pattern_color) and c != "white")
        scene = replace(ex.target_scene, background=replace(bg, pattern_rgb=COLORS[wrong], pattern_color=wrong))
        assert not checks.success(ex, render(scene)), ex.instruction


def test_a_word_that_reads_otherwise_or_in_another_colour_fails():
    for ex in _examples("text")[:8]:
        word = ex.target_scene.words[0]
        other = next(w for w in COLORS if w not in (word.text, ex.scene.words[0].text))
        misspelt = replace(ex.target_scene, words=(replace(word, text=other),))
        assert not checks.success(ex, render(misspelt)), ex.instruction
        wrong = next(c for c in COLORS if c not in (word.color, ex.scene.background.color, ex.scene.words[0].color))
        recoloured = replace(ex.target_scene, words=(replace(word, color=wrong, rgb=COLORS[wrong]),))
        assert not checks.success(ex, render(recoloured)), ex.instruction


@pytest.mark.parametrize("trait", ["body", "eyes", "marking", "accessory"])
def test_a_creature_with_one_trait_changed_fails(trait):
    for ex in _examples("creature")[:6]:
        c = ex.target_scene.creature
        values = checks.CREATURE_TRAITS[trait]
        other = values[(values.index(getattr(c, trait)) + 1) % len(values)]
        changed = replace(ex.target_scene, creature=replace(c, **{trait: other}))
        assert not checks.success(ex, render(changed)), (ex.instruction, trait, other)


def test_a_creature_left_where_it_was_fails_a_move():
    moved = [ex for ex in _examples("creature") if "position" in ex.info]
    assert moved
    for ex in moved:
        c = ex.scene.creature
        stayed = replace(ex.target_scene, creature=replace(ex.target_scene.creature, cx=c.cx, cy=c.cy))
        assert not checks.success(ex, render(stayed)), ex.instruction


@cache
def _creature_examples(how: str, n: int = 4) -> tuple[edits.Example, ...]:
    """Creature examples of one variant (`character.HOWS`): a family-wide draw may hold few of it."""
    rng = random.Random(f"test-checks:creature:{how}")
    out = []
    while len(out) < n:
        ex = edits.make_example(rng, "creature")
        if ex.info["how"] == how and visible(ex):
            out.append(ex)
    return tuple(out)


@pytest.mark.parametrize("how", character.HOWS)
def test_every_creature_variant_succeeds_as_drawn_and_blurred_and_fails_unchanged(how):
    for ex in _creature_examples(how):
        assert checks.success(ex, ex.target), ex.instruction
        assert checks.success(ex, ex.target.filter(ImageFilter.GaussianBlur(1))), ex.instruction
        assert not checks.success(ex, ex.context), ex.instruction


def _elsewhere_beside(ex: edits.Example) -> Scene | None:
    """The target with each new shape on the spot beside the creature farthest from the target's."""
    scene, w, h = ex.target_scene, ex.scene.width, ex.scene.height
    apart = (2 * character.SHAPE_REACH * character.BESIDE_SIZE + character.BESIDE_GAP) * min(w, h)
    placed: list[tuple[float, float]] = []
    for i in ex.info["added"]:
        o = scene.objects[i]
        free = [(x, y) for x, y in character.beside_spots(ex.scene)
                if all(math.hypot((x - px) * w, (y - py) * h) >= apart for px, py in placed)]
        if not free:
            return None
        placed.append(max(free, key=lambda spot: math.hypot((spot[0] - o.cx) * w, (spot[1] - o.cy) * h)))
        scene = scene.with_object(i, replace(o, cx=placed[-1][0], cy=placed[-1][1]))
    return scene


def test_shapes_beside_the_creature_on_another_side_than_the_targets_succeed():
    # "Beside" names no side: a model that draws them on the other side did as asked.
    elsewhere = [(ex, _elsewhere_beside(ex)) for ex in _creature_examples("beside")]
    elsewhere = [(ex, scene) for ex, scene in elsewhere if scene is not None and scene != ex.target_scene]
    assert len(elsewhere) >= 3
    for ex, scene in elsewhere:
        assert checks.success(ex, render(scene)), ex.instruction


def test_a_shape_beside_the_creature_of_another_kind_or_colour_or_left_out_fails():
    for ex in _creature_examples("beside"):
        i = ex.info["added"][0]
        o, bg = ex.target_scene.objects[i], ex.scene.background
        for kind in SHAPES:
            if kind != o.kind:
                assert not checks.success(ex, render(ex.target_scene.with_object(i, replace(o, kind=kind)))), (ex.instruction, kind)
        wrong = next(c for c in COLORS if c != o.color and distinct(COLORS[c], bg.rgb))
        recoloured = ex.target_scene.with_object(i, replace(o, color=wrong, rgb=COLORS[wrong]))
        assert not checks.success(ex, render(recoloured)), (ex.instruction, wrong)
        assert not checks.success(ex, render(ex.target_scene.without(i))), ex.instruction


def test_repainting_the_whole_image_fails_preservation():
    for ex in _examples("recolor")[:4]:
        flat = Image.new("RGB", ex.target.size, COLORS[ex.info["color"]])
        assert checks.verdict(ex, flat) == checks.Verdict(changed=True, kept=False)  # the object has its colour, the rest is lost
        assert not checks.success(ex, flat)


def test_output_of_another_size_fails():
    ex = _examples("remove")[0]
    assert not checks.success(ex, ex.target.resize((64, 64)))


def test_psnr():
    black = np.zeros((8, 8, 3), dtype=np.uint8)
    assert checks.psnr(black, black) == math.inf
    assert checks.psnr(black, black + 255) == pytest.approx(0.0)
    assert checks.psnr(black, black + 10) == pytest.approx(20 * math.log10(255 / 10))
    half = np.zeros((8, 8), dtype=bool)
    half[:4] = True
    other = black.copy()
    other[4:] = 255
    assert checks.psnr(black, other, mask=half) == math.inf
    assert math.isnan(checks.psnr(black, other, mask=np.zeros((8, 8), dtype=bool)))
    assert checks.psnr(Image.fromarray(black), Image.fromarray(other)) == pytest.approx(checks.db(255**2 / 2))
