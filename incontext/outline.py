"""A picked thing's outline on the input, at the input's own size.

The model's selector (incontext/selector.py) picks segments of what the model saw, at its
working size; mapped onto a larger input that pick is blocky and lacks the thing's
antialiased rim. Here it lands on the input's own segments (those it covers at least half
of) and takes the rim pixels that the thing covers over half of, as the world's own masks
count a pixel. Numpy only: the service runs it, and the service does not import torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from incontext import segments
from incontext.preserve import dilate

TOLERANCE = 8  # as selector.TOLERANCE: an object's rim steps by more from its inside
COVERED = 0.5  # a segment the pick covers this share of or more is the thing's
MARGIN = 4  # pixels around the pick's box in which the input's segments are judged


def _box3(a: np.ndarray) -> np.ndarray:
    """The sum over each pixel's 3 × 3 neighbourhood (zero beyond the edges)."""
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2))
    h, w = a.shape[:2]
    return sum(p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def outline(source: Image.Image, pick: np.ndarray) -> np.ndarray | None:
    """(h, w) bool at `source`'s size: the thing `pick` (bool, same size) marks, on the
    input's edges with its rim; None where the input is not a drawing there. Empty where the
    pick is."""
    thing = np.zeros(pick.shape, dtype=bool)
    if not pick.any():
        return thing
    ys, xs = np.nonzero(pick)
    top, left = max(0, ys.min() - MARGIN), max(0, xs.min() - MARGIN)
    bottom, right = ys.max() + MARGIN + 1, xs.max() + MARGIN + 1  # judged in the pick's box only: the cost follows the thing
    part = source.convert("RGB").crop((left, top, min(right, source.width), min(bottom, source.height)))
    labels = segments.labels(part, TOLERANCE)
    if labels is None:
        return None
    picked = pick[top:bottom, left:right]
    count = np.bincount(labels.ravel())
    cover = np.bincount(labels.ravel(), weights=picked.ravel().astype(np.float64), minlength=len(count)) / count
    inside = cover[labels] >= COVERED
    # The rim: pixels next to the inside, each a blend of the inside's colour beside it (T)
    # and the outside's beyond it (B); the thing covers it over half where it lies past the
    # middle of the two, on the line between them.
    rgb = np.asarray(part, dtype=np.float64)
    grown = dilate(inside, 1)
    ring, beyond = grown & ~inside, ~grown
    n_in, n_out = _box3(inside.astype(np.float64)), _box3(beyond.astype(np.float64))
    t = _box3(rgb * inside[..., None]) / np.maximum(n_in, 1)[..., None]
    b = _box3(rgb * beyond[..., None]) / np.maximum(n_out, 1)[..., None]
    span = t - b
    apart = (span * span).sum(-1)
    share = ((rgb - b) * span).sum(-1) / np.maximum(apart, 1e-9)
    rim = ring & (n_in > 0) & (n_out > 0) & (apart > TOLERANCE**2) & (share >= 0.5)
    thing[top:bottom, left:right] = inside | rim
    return thing


SMOOTH = 6.0  # levels RMS: a ring around the thing that a plane fits this well is one background (as snap.SMOOTH)
RING = 3  # pixels of the ring the background's plane is fitted to


def fill_behind(source: Image.Image, thing: np.ndarray, margin: int) -> tuple[Image.Image, np.ndarray] | None:
    """`source` with the thing (and `margin` pixels around it) replaced by the background
    behind it, and where that was ((h, w) bool): the plane (flat, or a linear gradient per
    channel) fitted to a ring of pixels around it. None where no plane fits that ring (the
    thing lies on other things, a texture, or two backgrounds): then only a model can say what
    is behind it."""
    region = dilate(thing, margin)
    ys, xs = np.nonzero(region)
    top, left = max(0, ys.min() - RING), max(0, xs.min() - RING)
    bottom, right = min(source.height, ys.max() + RING + 1), min(source.width, xs.max() + RING + 1)
    inside = region[top:bottom, left:right]
    ring = dilate(inside, RING) & ~inside
    if ring.sum() < 8:
        return None
    rgb = np.asarray(source.convert("RGB"), dtype=np.float64)[top:bottom, left:right]
    gy, gx = np.mgrid[top:bottom, left:right]
    design = np.stack([np.ones(ring.sum()), gy[ring], gx[ring]], axis=1)
    coef, *_ = np.linalg.lstsq(design, rgb[ring], rcond=None)
    if np.sqrt(((design @ coef - rgb[ring]) ** 2).mean()) > SMOOTH:
        return None
    out = np.asarray(source.convert("RGB")).copy()
    plane = np.stack([np.ones(inside.sum()), gy[inside], gx[inside]], axis=1) @ coef
    out[top:bottom, left:right][inside] = np.clip(np.rint(plane), 0, 255).astype(np.uint8)
    return Image.fromarray(out), region
