"""Workflow edits (issue 20): a second image to draw from, an emblem to place, an object to mask.

- bgref: the reference is another scene; the target is the context's objects over the
  reference's background (plain, gradient or textured, as the world draws backgrounds).
- emblem: the reference shows an emblem (a shape with a smaller shape of another colour
  inside) large on a plain background; the target has it drawn small at the named cell, or
  in the one free cell of a crowded scene ("the free spot").
- segment: the target is the named object's visible pixels, white on black.

Removal is the `remove` family of `edits`. `exact_mask` gives every workflow's exact pixels
(the removed object, the background taken, the emblem, the masked object) from scene data,
for the benchmark (bench/workflows.py). Each edit returns (target scene, instruction, info)
as `edits.apply_edit` does; the reference scene travels in info["reference_scene"].
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from incontext.world.language import POSITION_WORDS, phrase, say_object
from incontext.world.scene import (
    COLORS, POSITIONS, SHAPES, SUPERSAMPLE, Background, Scene, Shape, distinct, free_cells, jitter, object_mask,
)
from incontext.world.shapes import shape_polygon

FAMILIES = ("bgref", "emblem", "segment")
# What `bench quality --families workflows` scores: removal is an existing family.
BENCH_FAMILIES = ("remove", *FAMILIES)
EMBLEM_SIZE = 0.11  # radius of a placed emblem, fraction of the shorter side (an added shape is 0.13)
EMBLEM_INNER = 0.5  # the inner shape's radius relative to the outer's
REFERENCE_EMBLEM_SIZE = 0.32  # drawn large in the reference, so its inner shape is plain to see
EMBLEM_OUTER = ("circle", "square", "heart")  # outlines with room for a shape inside
FREE_SPOT_SHARE = 0.5  # emblem scenes filled up to one free cell
TEXTURED_REFERENCE = 0.3  # share of bgref references whose background has motifs
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def apply_edit(scene: Scene, family: str, rng: random.Random) -> tuple[Scene, str, dict] | None:
    if family == "bgref":
        return _bgref(scene, rng)
    if family == "emblem":
        return _emblem(scene, rng)
    if family == "segment":
        return _segment(scene, rng)
    raise ValueError(f"unknown workflow family {family!r}")


def _reference_background(rng: random.Random, context: Background) -> Background | None:
    """A background as the world draws them, clearly not the context's."""
    name = rng.choice([c for c in COLORS if c != context.color])
    rgb = jitter(COLORS[name], rng, 10)
    if not distinct(rgb, context.rgb):
        return None
    if rng.random() < TEXTURED_REFERENCE:
        motif = rng.choice([c for c in COLORS if distinct(COLORS[c], rgb)])
        return Background(rgb=rgb, color=name, pattern=rng.choice(SHAPES), pattern_rgb=COLORS[motif], pattern_color=motif)
    if rng.random() < 0.3:
        return Background(rgb=rgb, rgb2=jitter(rgb, rng, 30), color=name)
    return Background(rgb=rgb, color=name)


def _bgref(scene: Scene, rng: random.Random) -> tuple[Scene, str, dict] | None:
    from incontext.world.edits import random_scene  # edits imports this module

    background = _reference_background(rng, scene.background)
    if background is None or not all(distinct(o.rgb, background.rgb) for o in scene.objects):
        return None
    # Other objects on the reference, so the model learns to take its background only.
    reference = replace(random_scene(rng, size=(scene.width, scene.height)), background=background)
    reference = replace(reference, objects=tuple(o for o in reference.objects if distinct(o.rgb, background.rgb)))
    return replace(scene, background=background), phrase("bgref", rng), {"reference_scene": reference, "color": background.color}


def with_free_spot(scene: Scene, rng: random.Random) -> Scene:
    """Some emblem scenes get shapes in every cell but one: then "the free spot" names it."""
    if rng.random() >= FREE_SPOT_SHARE:
        return scene
    free = free_cells(scene)
    rng.shuffle(free)
    used = {(o.color, o.kind) for o in scene.objects}
    objs = list(scene.objects)
    for cell in free[1:]:
        while True:
            color, kind = rng.choice([c for c in COLORS if c != scene.background.color]), rng.choice(SHAPES)
            rgb = jitter(COLORS[color], rng)
            if (color, kind) not in used and distinct(rgb, scene.background.rgb):
                break
        used.add((color, kind))
        fx, fy = POSITIONS[cell]
        objs.append(Shape(kind=kind, color=color, rgb=rgb, cx=fx, cy=fy, size=rng.uniform(0.09, 0.12)))
    return replace(scene, objects=tuple(objs))


def emblem_shapes(outer: str, outer_color: str, inner: str, inner_color: str, cx: float, cy: float, size: float) -> tuple[Shape, Shape]:
    return (Shape(kind=outer, color=outer_color, rgb=COLORS[outer_color], cx=cx, cy=cy, size=size),
            Shape(kind=inner, color=inner_color, rgb=COLORS[inner_color], cx=cx, cy=cy, size=size * EMBLEM_INNER))


def _emblem(scene: Scene, rng: random.Random) -> tuple[Scene, str, dict] | None:
    free = free_cells(scene)
    if not free:
        return None
    outer, inner = rng.choice(EMBLEM_OUTER), rng.choice(SHAPES)
    outer_color = rng.choice([c for c in COLORS if distinct(COLORS[c], scene.background.rgb)])
    inner_color = rng.choice([c for c in COLORS if distinct(COLORS[c], COLORS[outer_color])])
    paper = rng.choice([c for c in COLORS if distinct(COLORS[c], COLORS[outer_color])])
    reference = Scene(width=scene.width, height=scene.height, background=Background(rgb=COLORS[paper], color=paper),
                      objects=emblem_shapes(outer, outer_color, inner, inner_color, 0.5, 0.5, REFERENCE_EMBLEM_SIZE))
    cell = rng.choice(free)
    fx, fy = POSITIONS[cell]
    placed = emblem_shapes(outer, outer_color, inner, inner_color, fx, fy, EMBLEM_SIZE)
    if len(free) == 1:  # a crowded scene: the instruction names the spot by its being free
        instruction = phrase("emblem_free", rng)
    else:
        instruction = phrase("emblem", rng, pos=rng.choice(POSITION_WORDS[cell]))
    info = {"reference_scene": reference, "index": len(scene.objects), "position": cell, "free_spot": len(free) == 1,
            "color": outer_color, "inner_color": inner_color}
    return replace(scene, objects=scene.objects + placed), instruction, info


def _segment(scene: Scene, rng: random.Random) -> tuple[Scene, str, dict] | None:
    if not scene.objects or scene.background.color == "black":
        return None  # on black, a white object's mask is nearly the picture itself: nothing to learn or score
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    if sum(1 for p in scene.objects if (p.color, p.kind) == (o.color, o.kind)) != 1:
        return None
    return segment_target(scene, i), phrase("segment", rng, obj=say_object(o.color, o.kind, rng)), {"index": i}


def segment_target(scene: Scene, i: int) -> Scene:
    """Object `i` in white, the objects drawn over it in black, on black: rendered, its visible
    pixels white on black, antialiased like everything else (so mid-grey splits it exactly)."""
    later = tuple(replace(p, rgb=BLACK, color="black") for p in scene.objects[i + 1 :])
    return Scene(width=scene.width, height=scene.height, background=Background(rgb=BLACK, color="black"),
                 objects=(replace(scene.objects[i], rgb=WHITE, color="white"), *later))


def visible_mask(scene: Scene, index: int) -> np.ndarray:
    """Where object `index` shows: its shape minus the objects drawn over it."""
    mask = object_mask(scene, index)
    for later in range(index + 1, len(scene.objects)):
        mask &= ~object_mask(scene, later)
    return mask


def exact_mask(example) -> np.ndarray:
    """Boolean (h, w): the pixels the workflow is about. remove: the removed object's (visible)
    pixels, which the target fills with what was behind it; bgref: the background where no
    object (nor its antialiased rim) touches it; emblem: the placed emblem; segment: the object's visible pixels (the target's
    white)."""
    family, scene = example.family, example.scene
    if family == "remove":
        return visible_mask(scene, example.info["index"])
    if family == "bgref":
        return ~_touched_by_objects(scene)
    if family == "emblem":
        return object_mask(example.target_scene, example.info["index"])
    if family == "segment":
        return np.asarray(example.target.convert("L")) > 127
    raise ValueError(f"no exact mask for family {family!r}")



def _touched_by_objects(scene: Scene) -> np.ndarray:
    """Boolean (h, w): every pixel an object covers at all (object_mask keeps those over half covered)."""
    s = SUPERSAMPLE
    w, h = scene.width * s, scene.height * s
    m = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(m)
    for o in scene.objects:
        draw.polygon(shape_polygon(o.kind, o.cx * w, o.cy * h, o.size * min(w, h), o.angle), fill=255)
    return np.asarray(m.reduce(s)) > 0
