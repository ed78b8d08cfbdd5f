"""Global and style edits: the whole image changes look (invert, night, pastel, pixelate,
outline), or the background gets a texture. Each sets scene data that `render` draws exactly.
"""

from __future__ import annotations

import random
from dataclasses import replace

from incontext.world.language import phrase
from incontext.world.looks import LOOKS
from incontext.world.scene import COLORS, SHAPES, Background, Scene, distinct

FAMILIES = ("invert", "night", "texture", "outline", "pixelate", "pastel")
# Families named after their look draw it; the look's name is the family's.
_LOOK_OF = {family: family for family in FAMILIES if family in LOOKS}


def apply_edit(scene: Scene, family: str, rng: random.Random) -> tuple[Scene, str, dict] | None:
    """The restyled scene, the instruction and facts about the edit; None if the scene doesn't allow it."""
    if scene.look is not None or scene.grayscale:
        return None  # one look at a time: a pastel negative has no single right answer
    if family == "texture":
        return _texture(scene, rng)
    look = _LOOK_OF[family]
    return replace(scene, look=look), phrase(family, rng), {"look": look}


def _texture(scene: Scene, rng: random.Random) -> tuple[Scene, str, dict] | None:
    """A new background colour with small shapes of another colour repeated over it."""
    objs = scene.objects
    options = [c for c in COLORS if c != scene.background.color and all(distinct(COLORS[c], o.rgb) for o in objs)]
    if not options:
        return None
    color = rng.choice(options)
    pattern_color = rng.choice([c for c in COLORS if distinct(COLORS[c], COLORS[color])])
    kind = rng.choice(SHAPES)
    background = Background(
        rgb=COLORS[color], color=color, pattern=kind, pattern_rgb=COLORS[pattern_color], pattern_color=pattern_color
    )
    instruction = phrase("texture", rng, color=color, pattern=f"{pattern_color} {kind}s")
    return replace(scene, background=background), instruction, {"color": color, "pattern": kind, "pattern_color": pattern_color}
