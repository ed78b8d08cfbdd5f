"""Scenes of coloured shapes on a background, and their antialiased rendering.

A scene is plain data (background + objects with continuous positions and sizes); an edit
changes the data and renders again, so the ground truth of every edit is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

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
class Background:
    rgb: tuple[int, int, int]
    rgb2: tuple[int, int, int] | None = None  # a vertical gradient to rgb2, if set
    color: str | None = None  # the name, when it has one


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: tuple[Shape, ...] = field(default_factory=tuple)
    grayscale: bool = False

    def without(self, index: int) -> "Scene":
        return replace(self, objects=self.objects[:index] + self.objects[index + 1 :])

    def with_object(self, index: int, obj: Shape) -> "Scene":
        objs = list(self.objects)
        objs[index] = obj
        return replace(self, objects=tuple(objs))


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Outline points of a shape centred on (cx, cy) with radius r, in pixels."""
    if kind == "circle":
        n = 64
        pts = [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)]
    elif kind == "square":
        s = 0.8  # a square of the same visual weight as a circle of radius 1
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif kind == "triangle":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
        pts = [(x, y + 0.15) for x, y in pts]  # centre the visual mass
    elif kind == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif kind == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x / 17.0, (y + 2.0) / 17.0))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _background_array(bg: Background, w: int, h: int) -> np.ndarray:
    top = np.array(bg.rgb, dtype=np.float32)
    if bg.rgb2 is None:
        return np.broadcast_to(top, (h, w, 3)).copy()
    bottom = np.array(bg.rgb2, dtype=np.float32)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).copy()


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.width × scene.height."""
    s = SUPERSAMPLE
    w, h = scene.width * s, scene.height * s
    canvas = Image.fromarray(_background_array(scene.background, w, h).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    side = min(w, h)
    for obj in scene.objects:
        draw.polygon(shape_polygon(obj.kind, obj.cx * w, obj.cy * h, obj.size * side, obj.angle), fill=obj.rgb)
    img = canvas.reduce(s)
    if scene.grayscale:
        img = img.convert("L").convert("RGB")
    return img


def object_mask(scene: Scene, index: int) -> np.ndarray:
    """Boolean (h, w) mask of where object `index` is drawn (ignoring occlusion by later objects)."""
    obj = scene.objects[index]
    s = SUPERSAMPLE
    w, h = scene.width * s, scene.height * s
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).polygon(shape_polygon(obj.kind, obj.cx * w, obj.cy * h, obj.size * min(w, h), obj.angle), fill=255)
    return np.asarray(m.reduce(s)) > 127
