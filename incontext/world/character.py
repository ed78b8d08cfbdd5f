"""Character reference: a creature kept identical while the instruction puts it elsewhere,
on another background, or both; or beside other shapes. The same trait values are drawn
again in the new place.

"Beside" names no side, so the spots a shape may go (`beside_spots`) are part of the world:
the edit draws on some of them, and a check accepts the shape on any of them.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np

from incontext.world.creature import ACCESSORIES, BODIES, EYES, MARKINGS, Creature
from incontext.world.language import POSITION_WORDS, phrase, say_object, say_things
from incontext.world.scene import COLORS, POSITIONS, SHAPES, Background, Scene, Shape, creature_masks, distinct, object_mask
from incontext.world.shapes import shape_polygon

SIZE = (0.16, 0.2)  # body radius, fraction of the shorter side
REACH = 1.7  # the creature's extent from its centre, in body radii (a hat reaches highest)
JITTER = 0.04
HOWS = ("move", "background", "both", "beside")
BESIDE_SIZE = 0.11  # radius of a shape put beside the creature, fraction of the shorter side
BESIDE_GAP = 0.03  # clear space around it, fraction of the shorter side: beside, not touching
BESIDE_DIRECTIONS = 16  # one spot per direction around the creature
BESIDE_MAX = 2  # shapes asked for at once
# The farthest any shape's outline reaches from its centre, in radii (a heart's tip, a triangle's corners).
SHAPE_REACH = max(math.hypot(x, y) for kind in SHAPES for x, y in shape_polygon(kind, 0.0, 0.0, 1.0))


def _colors_apart(*rgbs: tuple[int, int, int]) -> list[str]:
    return [c for c in COLORS if all(distinct(COLORS[c], rgb) for rgb in rgbs)]


def _clear(scene: Scene, cx: float, cy: float, size: float, others: list[tuple[float, float, float]]) -> bool:
    """Whether a creature at (cx, cy) keeps clear of the given (cx, cy, radius) discs, in pixels."""
    side = min(scene.width, scene.height)
    for ox, oy, r in others:
        dx, dy = (cx - ox) * scene.width, (cy - oy) * scene.height
        if (dx * dx + dy * dy) ** 0.5 < REACH * size * side + r * side:
            return False
    return True


def with_creature(scene: Scene, rng: random.Random) -> Scene:
    """`scene` with a creature in one cell; objects it would cover are left out."""
    cell = rng.choice(list(POSITIONS))
    fx, fy = POSITIONS[cell]
    size = rng.uniform(*SIZE)
    cx, cy = fx + rng.uniform(-JITTER, JITTER), fy + rng.uniform(-JITTER, JITTER)
    objects = tuple(o for o in scene.objects if _clear(scene, cx, cy, size, [(o.cx, o.cy, o.size)]))
    color = rng.choice(_colors_apart(scene.background.rgb, (250, 250, 250)))
    marking = rng.choice(_colors_apart(COLORS[color]))
    accessory = rng.choice(_colors_apart(COLORS[color], scene.background.rgb))
    body = rng.choice(BODIES)
    objects = tuple(o for o in objects if (o.color, o.kind) != (color, body))  # "the green circle" is the creature
    c = Creature(
        body=body, color=color, rgb=COLORS[color], cx=cx, cy=cy, size=size, eyes=rng.choice(EYES),
        marking=rng.choice(MARKINGS), marking_color=marking, marking_rgb=COLORS[marking],
        accessory=rng.choice(ACCESSORIES), accessory_color=accessory, accessory_rgb=COLORS[accessory],
    )
    return replace(scene, objects=objects, creature=c)


def apply_edit(scene: Scene, rng: random.Random) -> tuple[Scene, str, dict] | None:
    """Move the creature to a named cell, give it a new background, both, or put shapes beside it;
    None if impossible."""
    c = scene.creature
    if c is None:
        return None
    how = rng.choice(HOWS)
    if how == "beside":
        return _put_beside(scene, rng)
    info: dict = {"how": how}
    edited, slots = scene, {"obj": say_object(c.color, c.body, rng)}
    if how in ("move", "both"):
        discs = [(o.cx, o.cy, o.size) for o in scene.objects] + [(c.cx, c.cy, REACH * c.size)]
        cells = [p for p in POSITIONS if _clear(scene, *POSITIONS[p], c.size, discs)]
        if not cells:
            return None
        cell = rng.choice(cells)
        edited = replace(edited, creature=replace(c, cx=POSITIONS[cell][0], cy=POSITIONS[cell][1]))
        slots["pos"] = rng.choice(POSITION_WORDS[cell])
        info["position"] = cell
    if how in ("background", "both"):
        options = _colors_apart(c.rgb, c.accessory_rgb, *(o.rgb for o in scene.objects))
        options = [o for o in options if o != scene.background.color]
        if not options:
            return None
        color = rng.choice(options)
        edited = replace(edited, background=Background(rgb=COLORS[color], color=color))
        slots["color"] = color
        info["color"] = color
    return edited, phrase(f"creature_{how}", rng, **slots), info


def _clearance(mask: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """For each of the (m, 2) x, y points in pixels, the distance to the nearest pixel of the
    boolean (h, w) `mask`: 0 inside it, inf if it is empty."""
    padded = np.pad(mask, 1)
    inner = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    ys, xs = np.nonzero(mask & ~inner)  # from outside, the nearest pixel is on the rim: far fewer to measure
    if not len(xs):
        return np.full(len(centres), np.inf)
    dx, dy = centres[:, :1] - (xs + 0.5), centres[:, 1:] - (ys + 0.5)
    distance = np.sqrt(dx * dx + dy * dy).min(axis=1)
    col, row = np.floor(centres).astype(int).T
    on = (col >= 0) & (col < mask.shape[1]) & (row >= 0) & (row < mask.shape[0])
    distance[on] = np.where(mask[row[on], col[on]], 0.0, distance[on])
    return distance


def beside_spots(scene: Scene) -> list[tuple[float, float]]:
    """Centres (fractions of width and height) where a shape of BESIDE_SIZE sits beside the
    scene's creature: one per direction, as close as BESIDE_GAP allows, wholly inside the image
    and clear of the scene's objects. A direction with an object in the way has no spot."""
    w, h, c = scene.width, scene.height, scene.creature
    side = min(w, h)
    radius, gap = SHAPE_REACH * BESIDE_SIZE * side, BESIDE_GAP * side  # a disc any new shape fits in
    creature = np.logical_or.reduce(list(creature_masks(scene).values()))
    objects = np.zeros((h, w), dtype=bool)
    for i in range(len(scene.objects)):
        objects |= object_mask(scene, i)
    x0, y0 = c.cx * w, c.cy * h
    steps = np.arange(0.0, REACH * c.size * side + radius + gap + 2.0)  # the last step is past the creature
    spots = []
    for k in range(BESIDE_DIRECTIONS):
        angle = 2 * math.pi * k / BESIDE_DIRECTIONS
        ray = np.stack([x0 + steps * math.cos(angle), y0 + steps * math.sin(angle)], axis=1)
        # Walk out from the creature's centre to the first place the shape clears it.
        x, y = ray[int(np.argmax(_clearance(creature, ray) >= radius + gap))]
        inside = radius <= x <= w - radius and radius <= y <= h - radius
        if inside and _clearance(objects, np.array([[x, y]]))[0] >= radius + gap:
            spots.append((float(x / w), float(y / h)))
    return spots


def _put_beside(scene: Scene, rng: random.Random) -> tuple[Scene, str, dict] | None:
    """The creature where it is, with one or two new shapes on spots beside it. It does not
    move to make room: the instruction would not say where it went."""
    c, bg = scene.creature, scene.background
    side = min(scene.width, scene.height)
    apart = (2 * SHAPE_REACH * BESIDE_SIZE + BESIDE_GAP) * side  # two new shapes do not touch
    spots = beside_spots(scene)
    colors = _colors_apart(*(rgb for rgb in (bg.rgb, bg.rgb2) if rgb is not None))
    # Every named thing stays one thing: "the green circle" is the creature, "a red star" is new.
    taken = {(o.color, o.kind) for o in scene.objects} | {(c.color, c.body)}
    added: list[Shape] = []
    for _ in range(rng.randint(1, BESIDE_MAX)):
        free = [(x, y) for x, y in spots
                if all(math.hypot((x - o.cx) * scene.width, (y - o.cy) * scene.height) >= apart for o in added)]
        if not free:
            return None
        x, y = rng.choice(free)
        color, kind = rng.choice(colors), rng.choice(SHAPES)
        if (color, kind) in taken:
            return None
        taken.add((color, kind))
        added.append(Shape(kind=kind, color=color, rgb=COLORS[color], cx=x, cy=y, size=BESIDE_SIZE))
    edited = replace(scene, objects=scene.objects + tuple(added))
    things = say_things([(o.color, o.kind) for o in added], rng)
    instruction = phrase("creature_beside", rng, obj=say_object(c.color, c.body, rng), things=things)
    first = len(scene.objects)
    return edited, instruction, {"how": "beside", "added": list(range(first, first + len(added)))}
