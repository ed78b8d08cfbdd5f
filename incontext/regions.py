"""The 4-connected regions of a binary mask: their labels, and their bounding boxes as a
workflow's `boxes` report them. Labelled by runs of each row joined to the overlapping runs
of the row above (union-find): one pass, fast for the few regions of a mask even at 40 MP."""

from __future__ import annotations

import numpy as np

Box = list[int]  # [x0, y0, x1, y1], x1 and y1 exclusive (PIL's box)
MAX_BOXES = 16
MIN_REGION_SHARE = 1 / 1000  # regions smaller than this share of the image are specks, not things


def _runs(binary: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The runs of True in each row of a (h, w) bool map, (y, start, end, region), a region
    being a 4-connected component's smallest run id."""
    parent: list[int] = []

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    runs, above = [], []
    padded = np.zeros(binary.shape[1] + 2, dtype=np.int8)
    for y in range(binary.shape[0]):
        padded[1:-1] = binary[y]
        edges = np.diff(padded)
        row = []
        j = 0
        for s, e in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
            run = len(parent)
            parent.append(run)
            while j < len(above) and above[j][1] <= s:
                j += 1
            k = j
            while k < len(above) and above[k][0] < e:
                a, b = find(run), find(above[k][2])
                parent[max(a, b)] = min(a, b)
                k += 1
            row.append((s, e, run))
            runs.append((y, s, e, run))
        above = row
    return [(y, s, e, find(run)) for y, s, e, run in runs]


def label(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count): each 4-connected region of a (h, w) bool map numbered 1…count (int32), 0 elsewhere."""
    labels = np.zeros(binary.shape, dtype=np.int32)
    ids: dict[int, int] = {}
    for y, s, e, region in _runs(binary):
        labels[y, s:e] = ids.setdefault(region, len(ids) + 1)
    return labels, len(ids)


def boxes(binary: np.ndarray) -> list[Box]:
    """Bounding boxes of the 4-connected regions of a (h, w) bool map, largest first, specks
    (under MIN_REGION_SHARE of the image) left out, at most MAX_BOXES."""
    boxes: dict[int, list[int]] = {}
    for y, s, e, root in _runs(binary):
        if (b := boxes.get(root)) is None:
            boxes[root] = [s, y, e, y + 1, e - s]
        else:
            b[0], b[2], b[3], b[4] = min(b[0], s), max(b[2], e), y + 1, b[4] + e - s
    least = MIN_REGION_SHARE * binary.size
    kept = sorted((b for b in boxes.values() if b[4] >= least), key=lambda b: -b[4])
    return [b[:4] for b in kept[:MAX_BOXES]]
