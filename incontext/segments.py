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


def labels(image: Image.Image, tolerance: int = TOLERANCE) -> np.ndarray | None:
    """(h, w) int segment ids of `image`'s near-constant 4-connected regions, or None when it
    has more than MAX_RUNS runs. Runs of each row (neighbours within `tolerance`) are joined to
    the touching runs of the row above whose boundary pixels are within `tolerance` too."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    h, w, _ = rgb.shape
    breaks = np.abs(np.diff(rgb, axis=1)).max(axis=2) > tolerance  # (h, w-1): a new run starts at x+1
    starts = [np.concatenate(([0], np.flatnonzero(breaks[y]) + 1)) for y in range(h)]
    if sum(len(s) for s in starts) > MAX_RUNS:
        return None
    vertical = np.abs(rgb[1:] - rgb[:-1]).max(axis=2) <= tolerance  # (h-1, w): pixel joins the one above
    parent = list(range(sum(len(s) for s in starts)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    run_ids = np.empty((h, w), dtype=np.int64)
    first = 0
    for y in range(h):
        s = starts[y]
        ends = np.append(s[1:], w)
        for k, (a, b) in enumerate(zip(s.tolist(), ends.tolist())):
            run_ids[y, a:b] = first + k
        if y:
            # Each vertical link between a run and the run above it joins their sets.
            joined = np.flatnonzero(vertical[y - 1])
            if joined.size:
                pairs = np.unique(np.stack([run_ids[y, joined], run_ids[y - 1, joined]], axis=1), axis=0)
                for here, above in pairs.tolist():
                    ra, rb = find(here), find(above)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
        first += len(s)
    roots = np.array([find(i) for i in range(len(parent))])
    return roots[run_ids]


def snap(image: Image.Image, coarse: np.ndarray) -> np.ndarray:
    """`coarse` ((h, w) bool, at `image`'s size) with each segment of `image` it clearly covers
    filled and each it clearly misses cleared."""
    ids = labels(image)
    if ids is None:
        return coarse
    _, seg = np.unique(ids, return_inverse=True)
    seg = seg.reshape(ids.shape)
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
