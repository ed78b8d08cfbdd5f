"""Scenes of coloured shapes on a background, and their antialiased rendering.

A scene is plain data (background + objects with continuous positions and sizes); an edit
changes the data and renders again, so the ground truth of every edit is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from incontext.world import looks
from incontext.world.creature import Creature, draw_creature, part_masks
from incontext.world.shapes import shape_polygon

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "heart")
ROTATED_SHAPES = ("square", "triangle", "star")  # drawn at a small random angle; the rest look upright

# Grid cells people name, as fractions of width/height: the centre of each third.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top right": (0.8, 0.2),
    "left": (0.2, 0.5),
    "center": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom right": (0.8, 0.8),
}

SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges like other programs draw
# A background texture: motifs on a staggered grid, both fractions of the shorter side.
PATTERN_STEP = 0.24
PATTERN_SIZE = 0.06
WORD_BOLD = 0.05  # stroke width as a fraction of the font size


def jitter(rgb: tuple[int, int, int], rng, amount: int = 14) -> tuple[int, int, int]:
    """A colour near `rgb`: the same name, not the same pixel value."""
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)  # type: ignore[return-value]


def distinct(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two colours are far enough apart to tell an object from what is behind it."""
    return sum(abs(x - y) for x, y in zip(a, b)) > 90


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str  # a COLORS name: what a person would call it
    rgb: tuple[int, int, int]  # the drawn colour (jittered around the name's)
    cx: float  # centre, fraction of width
    cy: float  # centre, fraction of height
    size: float  # radius as a fraction of the shorter side
    angle: float = 0.0  # degrees


@dataclass(frozen=True)
class Word:
    """A short word drawn over the scene, centred on (cx, cy)."""

    text: str
    color: str
    rgb: tuple[int, int, int]
    cx: float  # fraction of width
    cy: float  # fraction of height
    size: float  # font size as a fraction of the shorter side


@dataclass(frozen=True)
class Background:
    rgb: tuple[int, int, int]
    rgb2: tuple[int, int, int] | None = None  # a vertical gradient to rgb2, if set
    color: str | None = None  # the name, when it has one
    pattern: str | None = None  # a SHAPES kind repeated over the background (a texture), if set
    pattern_rgb: tuple[int, int, int] | None = None
    pattern_color: str | None = None


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: tuple[Shape, ...] = field(default_factory=tuple)
    grayscale: bool = False
    look: str | None = None  # a whole-image look (`looks.LOOKS`) applied after drawing
    words: tuple[Word, ...] = ()  # drawn over the objects
    creature: Creature | None = None  # drawn over the objects, under the words

    def without(self, index: int) -> "Scene":
        return replace(self, objects=self.objects[:index] + self.objects[index + 1 :])

    def with_object(self, index: int, obj: Shape) -> "Scene":
        objs = list(self.objects)
        objs[index] = obj
        return replace(self, objects=tuple(objs))


def cell_of(obj: Shape) -> str:
    """The named grid cell (POSITIONS) nearest the object's centre."""
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - obj.cx) ** 2 + (POSITIONS[p][1] - obj.cy) ** 2)


def free_cells(scene: Scene) -> list[str]:
    """The named cells no object sits in, in POSITIONS order."""
    taken = {cell_of(o) for o in scene.objects}
    return [p for p in POSITIONS if p not in taken]


def _background_array(bg: Background, w: int, h: int) -> np.ndarray:
    top = np.array(bg.rgb, dtype=np.float32)
    if bg.rgb2 is None:
        return np.broadcast_to(top, (h, w, 3)).copy()
    bottom = np.array(bg.rgb2, dtype=np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).copy()


def pattern_centres(width: int, height: int) -> list[tuple[float, float]]:
    """Where a background texture's motifs sit, in pixels: a grid with every other row shifted."""
    step = PATTERN_STEP * min(width, height)
    centres = []
    for row in range(int(height / step) + 2):
        shift = step / 2 if row % 2 else 0.0
        for col in range(int(width / step) + 2):
            centres.append((step / 4 + shift + col * step, step / 4 + row * step))
    return centres


def _draw_pattern(draw: ImageDraw.ImageDraw, bg: Background, w: int, h: int, fill) -> None:
    r = PATTERN_SIZE * min(w, h)
    for x, y in pattern_centres(w, h):
        draw.polygon(shape_polygon(bg.pattern, x, y, r), fill=fill)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw_word(draw: ImageDraw.ImageDraw, word: Word, w: int, h: int, fill) -> None:
    size = max(4, round(word.size * min(w, h)))
    # A stroke in the fill colour makes the letters bold enough to survive an autoencoder's blur.
    draw.text((word.cx * w, word.cy * h), word.text, font=_font(size), fill=fill, anchor="mm",
              stroke_width=max(1, round(size * WORD_BOLD)), stroke_fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.width × scene.height."""
    s = SUPERSAMPLE
    w, h = scene.width * s, scene.height * s
    canvas = Image.fromarray(_background_array(scene.background, w, h).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    side = min(w, h)
    if scene.background.pattern is not None:
        _draw_pattern(draw, scene.background, w, h, fill=scene.background.pattern_rgb)
    for obj in scene.objects:
        draw.polygon(shape_polygon(obj.kind, obj.cx * w, obj.cy * h, obj.size * side, obj.angle), fill=obj.rgb)
    if scene.creature is not None:
        draw_creature(canvas, scene.creature)
    for word in scene.words:
        _draw_word(draw, word, w, h, fill=word.rgb)
    if scene.look == "outline":  # traced on the sharp canvas, so lines are antialiased like shapes
        canvas = looks.outline(canvas, width=2 * s)
    img = canvas.reduce(s)
    if scene.grayscale:
        img = img.convert("L").convert("RGB")
    if scene.look not in (None, "outline"):
        img = looks.apply(scene.look, img)
    return img


def pattern_mask(scene: Scene) -> np.ndarray:
    """Boolean (h, w) mask of the background texture's motifs (ignoring the objects over them)."""
    s = SUPERSAMPLE
    m = Image.new("L", (scene.width * s, scene.height * s), 0)
    if scene.background.pattern is not None:
        _draw_pattern(ImageDraw.Draw(m), scene.background, *m.size, fill=255)
    return np.asarray(m.reduce(s)) > 127


def word_mask(scene: Scene, index: int) -> np.ndarray:
    """Boolean (h, w) mask of the letters of word `index`."""
    s = SUPERSAMPLE
    m = Image.new("L", (scene.width * s, scene.height * s), 0)
    _draw_word(ImageDraw.Draw(m), scene.words[index], *m.size, fill=255)
    return np.asarray(m.reduce(s)) > 127


def creature_masks(scene: Scene) -> dict[str, np.ndarray]:
    """Boolean (h, w) mask of each part of the scene's creature (`creature.PARTS`)."""
    return part_masks(scene.creature, scene.width, scene.height, SUPERSAMPLE)


def object_mask(scene: Scene, index: int) -> np.ndarray:
    """Boolean (h, w) mask of where object `index` is drawn (ignoring occlusion by later objects)."""
    obj = scene.objects[index]
    s = SUPERSAMPLE
    w, h = scene.width * s, scene.height * s
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).polygon(shape_polygon(obj.kind, obj.cx * w, obj.cy * h, obj.size * min(w, h), obj.angle), fill=255)
    return np.asarray(m.reduce(s)) > 127
