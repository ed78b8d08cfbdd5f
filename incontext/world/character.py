"""Character reference: a creature kept identical while the instruction puts it elsewhere,
on another background, or both. The same trait values are drawn again in the new place.
"""

from __future__ import annotations

import random
from dataclasses import replace

from incontext.world.creature import ACCESSORIES, BODIES, EYES, MARKINGS, Creature
from incontext.world.language import POSITION_WORDS, phrase, say_object
from incontext.world.scene import COLORS, POSITIONS, Background, Scene, distinct

SIZE = (0.16, 0.2)  # body radius, fraction of the shorter side
REACH = 1.7  # the creature's extent from its centre, in body radii (a hat reaches highest)
JITTER = 0.04


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
    """Move the creature to a named cell, give it a new background, or both; None if impossible."""
    c = scene.creature
    if c is None:
        return None
    how = rng.choice(("move", "background", "both"))
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
