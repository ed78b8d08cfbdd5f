"""A coarse mask snapped to the image's own edges: the segmentation workflow's last step.

A model draws its mask through its autoencoder, which blurs edges and small things (nano's
8× latents: a mask's outline is off by a pixel or two, and small objects' masks shrink). The
image itself has sharp edges. So the image is split into segments, 4-connected pixels of
nearly one colour, and every segment the coarse mask clearly covers (`CLEAR[1]` of its
pixels or more) becomes wholly white, every one it clearly misses (`CLEAR[0]` or less) wholly
black; a segment it covers in part keeps the coarse mask's pixels, so a segment that spans the
object's edge (the object's colour runs into the background's) is no worse than before.
Clearing removes only a blurred edge: coarse pixels more than `BAND` pixels inside the coarse
mask stay, so a thing with no edge of its own in the image (its colour that of what is around
it) keeps its mask, a band narrower.

Images without flat regions (photographs: nearly every pixel its own segment) are left to
the coarse mask: past `MAX_RUNS` runs of one colour the labelling stops, since snapping
could not change much there.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TOLERANCE = 24  # largest step between neighbouring pixels of one segment, per RGB channel
CLEAR = (0.2, 0.8)  # a segment with this share of its pixels in the coarse mask or less / or more is decided whole
BAND = 4  # pixels: about the blur of an 8x autoencoder's edge (half a latent cell)
MAX_RUNS = 200_000


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b|'s largest channel, per pixel: how many levels apart two colours are. Over the
    channels one by one: numpy's max over a last axis of 3 is several times slower."""
    d = np.abs(a - b)
    out = d[..., 0]
    for c in range(1, d.shape[-1]):
        out = np.maximum(out, d[..., c])
    return out


def labels(image: Image.Image, tolerance: int = TOLERANCE) -> np.ndarray | None:
    """(h, w) int segment ids of `image`'s near-constant 4-connected regions, or None when it
    has more than MAX_RUNS runs. Runs of each row (neighbours within `tolerance`) are joined to
    the touching runs of the row above whose boundary pixels are within `tolerance` too. Ids
    run from 0 to the number of segments − 1, in the order of each segment's first pixel."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    h, w, _ = rgb.shape
    starts = np.ones((h, w), dtype=bool)  # a run starts at x = 0 and after each break
    starts[:, 1:] = distance(rgb[:, 1:], rgb[:, :-1]) > tolerance
    n = int(starts.sum())
    if n > MAX_RUNS:
        return None
    run_ids = np.cumsum(starts.ravel()).reshape(h, w) - 1
    linked = distance(rgb[1:], rgb[:-1]) <= tolerance  # (h-1, w): pixel joins the one above
    key = run_ids[1:] * n + run_ids[:-1]  # which run joins which run above
    first = linked.copy()  # one pixel of each stretch where the same two runs touch
    first[:, 1:] &= ~(linked[:, :-1] & (key[:, 1:] == key[:, :-1]))
    here, above = np.divmod(key[first], n)
    # Connected runs, all at once: each set's root is its smallest run. Every link hooks the
    # larger of its two roots under the smaller, then each run is pointed at its new root.
    roots = np.arange(n)
    while not np.array_equal(a := roots[here], b := roots[above]):
        low = np.minimum(a, b)
        np.minimum.at(roots, a, low)
        np.minimum.at(roots, b, low)
        while not np.array_equal(deeper := roots[roots], roots):
            roots = deeper
    _, ids = np.unique(roots, return_inverse=True)  # over runs, not pixels: cheap
    return ids.reshape(-1)[run_ids]


def snap(image: Image.Image, coarse: np.ndarray) -> np.ndarray:
    """`coarse` ((h, w) bool, at `image`'s size) with each segment of `image` it clearly covers
    filled and each it clearly misses cleared."""
    seg = labels(image)
    if seg is None:
        return coarse
    share = np.bincount(seg.ravel(), weights=coarse.ravel().astype(np.float64)) / np.bincount(seg.ravel())
    decided = (share <= CLEAR[0]) | (share >= CLEAR[1])
    return np.where(decided[seg], (share >= CLEAR[1])[seg], coarse) | erode(coarse, BAND)


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """`mask` without the pixels within `steps` 4-neighbour steps of a pixel outside it (or of the border)."""
    out = mask.copy()
    for _ in range(steps):
        inner = np.zeros_like(out)
        inner[1:-1, 1:-1] = out[1:-1, 1:-1] & out[:-2, 1:-1] & out[2:, 1:-1] & out[1:-1, :-2] & out[1:-1, 2:]
        out = inner
    return out
