"""Whole-image looks: the global and style edits that repaint every pixel by a fixed rule.

A scene names its look (`Scene.look`) and `render` applies it last, so the ground truth of
"make it night" is exact: the same scene, drawn the same way, then darkened.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

LOOKS = ("invert", "night", "pastel", "pixelate", "outline")

# Night: dimmed, more in red and green than in blue, lifted a little towards a dark blue.
NIGHT_GAIN = np.array([0.30, 0.34, 0.50], dtype=np.float32)
NIGHT_LIFT = np.array([6.0, 10.0, 32.0], dtype=np.float32)
# Pastel: halfway to a light gray, so colours stay recognisable but soft and bright.
PASTEL_KEEP = 0.45
PASTEL_LIFT = 0.55 * 240.0
PIXEL_BLOCKS = 16  # blocks along the shorter side
OUTLINE_STEP = 30  # levels between neighbouring (supersampled) pixels that make an edge
OUTLINE_INK, OUTLINE_PAPER = (30, 30, 30), (250, 250, 250)


def outline(canvas: Image.Image, width: int) -> Image.Image:
    """Black lines on white paper where the (supersampled, unsmoothed) canvas has an edge.

    A gradient background changes far less than `OUTLINE_STEP` per pixel and draws no line."""
    a = np.asarray(canvas, dtype=np.int16)
    edge = np.zeros(a.shape[:2], dtype=bool)
    edge[:, 1:] |= np.abs(a[:, 1:] - a[:, :-1]).max(axis=2) > OUTLINE_STEP
    edge[1:] |= np.abs(a[1:] - a[:-1]).max(axis=2) > OUTLINE_STEP
    lines = Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * (width // 2) + 1))
    paper = Image.new("RGB", canvas.size, OUTLINE_PAPER)
    paper.paste(OUTLINE_INK, mask=lines)
    return paper


def pixelate(img: Image.Image) -> Image.Image:
    w, h = img.size
    block = max(1, round(min(w, h) / PIXEL_BLOCKS))
    return img.resize((max(1, round(w / block)), max(1, round(h / block))), Image.BOX).resize((w, h), Image.NEAREST)


def apply(look: str, img: Image.Image) -> Image.Image:
    """The rendered image in `look` (all but outline, which needs the supersampled canvas)."""
    if look == "pixelate":
        return pixelate(img)
    a = np.asarray(img, dtype=np.float32)
    if look == "invert":
        a = 255.0 - a
    elif look == "night":
        a = a * NIGHT_GAIN + NIGHT_LIFT
    elif look == "pastel":
        a = a * PASTEL_KEEP + PASTEL_LIFT
    else:
        raise ValueError(f"unknown look {look!r}")
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
