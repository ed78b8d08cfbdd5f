"""Text editing: a colour name written in the scene, recoloured or replaced by another.

The words are colour names because those are words the bundled tokenizer knows, so an
instruction can quote both the old and the new word.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import cache

from PIL import ImageFont

from incontext.world.language import phrase
from incontext.world.scene import COLORS, WORD_BOLD, Scene, Word, distinct

WORDS = tuple(COLORS)
ROWS = (0.2, 0.5, 0.8)  # a word sits on one row of the position grid, in place of its objects
WORD_SIZE = (0.17, 0.22)  # font size range, fraction of the shorter side
MAX_WIDTH = 0.8  # the widest word may fill this fraction of the image's width


@cache
def _widest_per_size() -> float:
    """Width of the widest word in pixels per pixel of font size, bold stroke included."""
    font = ImageFont.load_default(size=100)
    return max(font.getlength(w) for w in WORDS) / 100 + 2 * WORD_BOLD


def with_word(scene: Scene, rng: random.Random) -> Scene:
    """`scene` with a colour name written across one row; the objects on that row are left out."""
    row = rng.choice(ROWS)
    objects = tuple(o for o in scene.objects if min(ROWS, key=lambda r: abs(r - o.cy)) != row)
    color = rng.choice([c for c in COLORS if distinct(COLORS[c], scene.background.rgb)])
    shorter = min(scene.width, scene.height)
    size = min(rng.uniform(*WORD_SIZE), MAX_WIDTH * scene.width / (shorter * _widest_per_size()))
    word = Word(
        text=rng.choice(WORDS), color=color, rgb=COLORS[color],
        cx=0.5 + rng.uniform(-0.05, 0.05), cy=row + rng.uniform(-0.04, 0.04), size=size,
    )
    return replace(scene, objects=objects, words=(word,))


def apply_edit(scene: Scene, rng: random.Random) -> tuple[Scene, str, dict] | None:
    """Recolour the word or write another in its place; None if the scene has no word."""
    if not scene.words:
        return None
    word = scene.words[0]
    if rng.random() < 0.5:
        color = rng.choice([c for c in COLORS if c != word.color and distinct(COLORS[c], scene.background.rgb)])
        edited = replace(word, color=color, rgb=COLORS[color])
        instruction = phrase("text_color", rng, color=color)
        return replace(scene, words=(edited,)), instruction, {"edit": "color", "color": color, "word": word.text}
    new = rng.choice([w for w in WORDS if w != word.text])
    edited = replace(word, text=new)
    instruction = phrase("text_word", rng, old=word.text, new=new)
    return replace(scene, words=(edited,)), instruction, {"edit": "word", "color": word.color, "word": new}
