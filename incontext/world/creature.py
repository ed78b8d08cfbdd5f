"""A creature with distinctive traits: body shape and colour, eyes, markings, an accessory.

Drawn part by part into a label image (later parts over earlier ones), so every trait's
exact visible pixels are known: a check can ask whether each trait survived an edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from incontext.world.shapes import shape_polygon

BODIES = ("circle", "square")
MARKINGS = ("spots", "stripes", "belly")
ACCESSORIES = ("hat", "bow", "crown")
EYES = (1, 2, 3)
PARTS = ("body", "marking", "eyes", "pupils", "accessory")  # drawing order
EYE_WHITE, PUPIL = (250, 250, 250), (20, 20, 20)


@dataclass(frozen=True)
class Creature:
    body: str  # a BODIES kind
    color: str
    rgb: tuple[int, int, int]
    cx: float  # centre of the body, fraction of width
    cy: float  # fraction of height
    size: float  # body radius, fraction of the shorter side
    eyes: int
    marking: str
    marking_color: str
    marking_rgb: tuple[int, int, int]
    accessory: str
    accessory_color: str
    accessory_rgb: tuple[int, int, int]

    def part_rgb(self, part: str) -> tuple[int, int, int]:
        return {"body": self.rgb, "marking": self.marking_rgb, "eyes": EYE_WHITE, "pupils": PUPIL,
                "accessory": self.accessory_rgb}[part]


def _labels(c: Creature, w: int, h: int) -> np.ndarray:
    """(h, w) uint8: 0 outside the creature, else 1 + the index in PARTS of the part on top."""
    r, x0, y0 = c.size * min(w, h), c.cx * w, c.cy * h

    def at(x: float, y: float) -> tuple[float, float]:  # body units (radius 1, y down) to pixels
        return x0 + r * x, y0 + r * y

    def layer() -> tuple[Image.Image, ImageDraw.ImageDraw]:
        img = Image.new("L", (w, h), 0)
        return img, ImageDraw.Draw(img)

    body, draw = layer()
    draw.polygon(shape_polygon(c.body, x0, y0, r), fill=255)
    top = -1.0 if c.body == "circle" else -0.8
    marking, draw = layer()
    if c.marking == "spots":
        for x, y in ((-0.45, 0.2), (0.42, 0.35), (-0.05, 0.62), (0.5, -0.05)):
            draw.ellipse([*at(x - 0.17, y - 0.17), *at(x + 0.17, y + 0.17)], fill=255)
    elif c.marking == "stripes":
        for y in (0.08, 0.36, 0.64):
            draw.rectangle([*at(-1.2, y), *at(1.2, y + 0.14)], fill=255)
    else:
        draw.ellipse([*at(-0.55, 0.1), *at(0.55, 0.85)], fill=255)
    eyes, draw_eyes = layer()
    pupils, draw_pupils = layer()
    # Big eyes with small pupils: the whites must stay white through an autoencoder's blur.
    radius = {1: 0.42, 2: 0.33, 3: 0.25}[c.eyes]
    for x in {1: (0.0,), 2: (-0.38, 0.38), 3: (-0.55, 0.0, 0.55)}[c.eyes]:
        draw_eyes.ellipse([*at(x - radius, -0.3 - radius), *at(x + radius, -0.3 + radius)], fill=255)
        p = 0.35 * radius
        draw_pupils.ellipse([*at(x - p, -0.3 - p), *at(x + p, -0.3 + p)], fill=255)
    accessory, draw = layer()
    if c.accessory == "hat":
        draw.rectangle([*at(-0.42, top - 0.62), *at(0.42, top + 0.05)], fill=255)
        draw.rectangle([*at(-0.7, top - 0.05), *at(0.7, top + 0.1)], fill=255)
    elif c.accessory == "bow":
        knot = (0.5, top + 0.12)
        draw.polygon([at(*knot), at(knot[0] - 0.42, knot[1] - 0.28), at(knot[0] - 0.42, knot[1] + 0.28)], fill=255)
        draw.polygon([at(*knot), at(knot[0] + 0.42, knot[1] - 0.28), at(knot[0] + 0.42, knot[1] + 0.28)], fill=255)
    else:
        xs = (-0.5, -0.25, 0.0, 0.25, 0.5)
        tips = [at(x, top - (0.55 if i % 2 == 0 else 0.25)) for i, x in enumerate(xs)]
        draw.polygon([at(-0.5, top + 0.1), *tips, at(0.5, top + 0.1)], fill=255)
    labels = np.zeros((h, w), dtype=np.uint8)
    layers = (body, Image.fromarray(np.asarray(marking) & np.asarray(body)), eyes, pupils, accessory)
    for i, part in enumerate(layers):
        labels[np.asarray(part) > 0] = i + 1  # markings are clipped to the body; the rest sit on top
    return labels


def draw_creature(canvas: Image.Image, c: Creature) -> None:
    """Paint the creature onto a (supersampled) RGB canvas in place."""
    labels = _labels(c, *canvas.size)
    for i, part in enumerate(PARTS):
        canvas.paste(c.part_rgb(part), mask=Image.fromarray((labels == i + 1).astype(np.uint8) * 255))


def part_masks(c: Creature, width: int, height: int, supersample: int) -> dict[str, np.ndarray]:
    """Boolean (height, width) mask of where each part shows, drawn like `render` draws it."""
    labels = _labels(c, width * supersample, height * supersample)
    masks = {}
    for i, part in enumerate(PARTS):
        m = Image.fromarray((labels == i + 1).astype(np.uint8) * 255).reduce(supersample)
        masks[part] = np.asarray(m) > 127
    return masks
