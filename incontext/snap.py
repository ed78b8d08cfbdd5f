"""An edit snapped to the input's flat regions: crisp recolours, the autoencoder's blur taken back.

A model draws what it changes through its autoencoder: a recoloured circle comes back as a
blob of the new colour a little off the circle's outline, and the objects a background edit
should have left alone come back with smeared edges. Where the input is made of flat regions
(drawings, diagrams, logos, the nano world: `segments.labels`), most of what an edit does is
one new colour map per region. So, inside the region preserve found:

- a segment of the input that the model repainted over most of its pixels (`COVER`), most of
  them (`CONSISTENT`) to what one colour map of the segment explains, is fitted that map: a
  colour for a flat segment, an affine map per channel for a gradient; one whose new colour is
  close to the plane fitted around it (`MERGE`) takes that plane: a removed object becomes the
  background behind it, without a ghost a few levels off it;
- a repainted pixel whose colour the regions around it explain takes its segment's fitted
  colour (the input's own pixel, where the segment was not refitted): that colour itself,
  part of the way to it from the input's colour, or a blend with the new colour of a solid
  segment up to `REACH` pixels away where one side was recoloured (`RECOLOURED`): the
  autoencoder's blur across an edge, also where that blur keeps some of the recoloured side's
  old colour (a pink fleck beside a red circle turned blue);
- an antialiased edge beside a refitted segment (a thin segment's blend of the two solid
  segments it lies between, `RIM`) is redone as the same blend of their new colours;
- a pixel that nothing around it explains is something new (an added object, a letter, a
  line) and keeps the model's output, but for specks (`MIN_NEW`).

A pixel the model moved by no more than a few levels is the input's. Photographs, where most
pixels differ from their neighbours (`FLAT_SHARE`), are left as preserve composed them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from incontext import segments

# Levels between neighbouring pixels of one segment: a gradient's steps, not an antialiased edge's
# (with segments.TOLERANCE an object's soft edge can join it to the background).
SEGMENT_STEP = 8
COVER = 0.5  # share of a segment's pixels the model must have repainted for the segment to be refitted
CONSISTENT = 0.5  # share of those pixels its fitted colour map must explain
TOLERANCE = 40  # levels (max over channels) within which a colour counts as explained
RECOLOURED = 32  # levels: a segment's colour moved by more than this (on average) is recoloured, not tinted
REPAINTED = 6  # levels: a pixel the model moved less than this from the input is not repainted
REACH = 8  # pixels at the model's working size: how far the autoencoder's blur carries a colour
BLUR_MOST = 0.85  # most of the other side's colour that blur puts in a pixel of a repainted segment
FLAT_STD = 3.0  # levels: a segment whose channels vary less than this is flat (one colour)
RIDGE = 25.0  # levels²: keeps a nearly flat segment's affine fit from amplifying noise
FLAT_SHARE = 0.75  # share of pixels within FLAT_STD of their right-hand neighbour: a drawing, not a photograph
MERGE = 15  # levels: a refitted segment this close to what surrounds it has gone into its surroundings
# The surroundings a plane is fitted to: a ring RING_WIDTH wide, RING_MARGIN pixels out from the
# segment, past its antialiased rim (a blend of the two colours would spoil the fit).
RING_MARGIN = 2
RING_WIDTH = 2
SMOOTH = 6.0  # levels RMS: surroundings a plane (flat or a linear gradient) fits this well are one region
RIM = 12  # levels: a pixel this close to a blend of the two segments beside it is their antialiased edge
MIN_NEW = 6  # pixels at the model's working size: a smaller speck of something new is the autoencoder's noise
BLEED = 12  # levels: a segment's new colour this close to a blend of its old one and a neighbour's new one is that neighbour's blur
BLEED_SHARE = 0.5  # at most this much of the neighbour's new colour: more is a recolour towards it
BLEED_REACH = 3  # pixels: how far apart two segments may be to bleed into each other (an antialiased rim between)
MAX_PIXELS = 1_100_000  # larger boxes (past about 1024²) are left as composed: the cost grows with the pixels


def _grouped_median(values: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """(count,) median of `values` per group id in [0, count); NaN for an empty group."""
    order = np.lexsort((values, groups))
    sizes = np.bincount(groups, minlength=count)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    out = np.full(count, np.nan, dtype=np.float64)
    filled = sizes > 0
    lo = values[order][starts[filled] + (sizes[filled] - 1) // 2]
    hi = values[order][starts[filled] + sizes[filled] // 2]
    out[filled] = (lo + hi) / 2
    return out


def _fit(base: np.ndarray, comp: np.ndarray, seg: np.ndarray, repainted: np.ndarray, count: int) -> np.ndarray:
    """(h, w, 3) float32: each segment's colour map fitted on its repainted pixels, applied to
    the whole segment; the input itself where a segment has no repainted pixels."""
    fitted = base.astype(np.float32).copy()
    ids = seg[repainted]
    n = np.bincount(ids, minlength=count).astype(np.float64)
    whole = np.bincount(seg.ravel(), minlength=count).astype(np.float64)
    for c in range(3):
        x, y = base[..., c][repainted].astype(np.float64), comp[..., c][repainted].astype(np.float64)
        safe = np.maximum(n, 1)
        mx, my = np.bincount(ids, x, count) / safe, np.bincount(ids, y, count) / safe
        var = np.bincount(ids, x * x, count) / safe - mx * mx
        cov = np.bincount(ids, x * y, count) / safe - mx * my
        # Flatness is the whole segment's: a gradient stays a gradient under its map.
        allx = base[..., c].ravel().astype(np.float64)
        wm = np.bincount(seg.ravel(), allx, count) / whole
        wvar = np.bincount(seg.ravel(), allx * allx, count) / whole - wm * wm
        slope = np.where(wvar > FLAT_STD**2, cov / (var + RIDGE), 0.0)
        level = np.where(wvar > FLAT_STD**2, my - slope * mx, _grouped_median(y, ids, count))
        mapped = slope[seg] * base[..., c] + level[seg]
        fitted[..., c] = np.where(n[seg] > 0, mapped, fitted[..., c])
    return np.clip(fitted, 0, 255)


def _on_blend(color: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The max-channel distance from `color` to the nearest (least squares) blend of `a` and `b`,
    and the share of `b` that nearest point of the line through them has (unclipped)."""
    d = b - a
    t = ((color - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-6)
    return segments.distance(color, a + np.clip(t, 0.0, 1.0)[..., None] * d), t


def _off_blend(color: np.ndarray, a: np.ndarray, b: np.ndarray, most_b: float = 1.0) -> np.ndarray:
    """(h, w) the max-channel distance from `color` to the nearest blend of `a` and `b`; infinite
    where `color` is nearer a blend with more than `most_b` of `b`."""
    off, t = _on_blend(color, a, b)
    return np.where(t > most_b, np.inf, off)


def _off_triangle(color: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The max-channel distance from `color` to the nearest (least squares) blend of `a`, `b` and
    `c`, and that blend's share of `b`; both (n,)."""
    u, v, w = b - a, c - a, color - a
    uu, uv, vv = (u * u).sum(-1), (u * v).sum(-1), (v * v).sum(-1)
    wu, wv = (w * u).sum(-1), (w * v).sum(-1)
    det = uu * vv - uv * uv
    safe = np.where(np.abs(det) > 1e-6, det, 1.0)
    sb, sc = (vv * wu - uv * wv) / safe, (uu * wv - uv * wu) / safe
    inside = (np.abs(det) > 1e-6) & (sb >= 0) & (sc >= 0) & (sb + sc <= 1)
    best = np.where(inside, segments.distance(color, a + sb[..., None] * u + sc[..., None] * v), np.inf)
    share = np.where(inside, sb, 0.0)
    # Outside the triangle the nearest blend lies on one of its edges.
    for p, q, of_b in ((a, b, lambda t: t), (b, c, lambda t: 1 - t), (a, c, lambda t: np.zeros_like(t))):
        off, t = _on_blend(color, p, q)
        nearer = off < best
        best, share = np.where(nearer, off, best), np.where(nearer, of_b(np.clip(t, 0.0, 1.0)), share)
    return best, share


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`image` moved by (dy, dx), edges repeated: each pixel sees the one (dy, dx) away."""
    h, w = image.shape[:2]
    rows = np.clip(np.arange(h) + dy, 0, h - 1)
    cols = np.clip(np.arange(w) + dx, 0, w - 1)
    return image[rows[:, None], cols[None, :]]


def _merged(target: np.ndarray, seg: np.ndarray, refit: np.ndarray) -> np.ndarray:
    """`target` where each refitted segment whose new colour is within MERGE of the plane fitted
    to the pixels around it takes that plane's colours: a removed object becomes the background
    behind it (a gradient too), seamlessly, instead of a shape a few levels off it."""
    h, w = seg.shape
    count = len(refit)
    sizes = np.bincount(seg.ravel(), minlength=count)
    # Each segment's bounding box, from one pass over the image (not one per segment).
    rows, cols = np.indices(seg.shape)
    top, left = np.full(count, h), np.full(count, w)
    bottom, right = np.zeros(count, int), np.zeros(count, int)
    np.minimum.at(top, seg.ravel(), rows.ravel())
    np.maximum.at(bottom, seg.ravel(), rows.ravel())
    np.minimum.at(left, seg.ravel(), cols.ravel())
    np.maximum.at(right, seg.ravel(), cols.ravel())
    out = target.copy()
    for s in np.flatnonzero(refit & (sizes >= 4) & (sizes < 0.25 * h * w)):
        m = RING_MARGIN + RING_WIDTH
        y0, y1, x0, x1 = max(top[s] - m, 0), min(bottom[s] + m + 1, h), max(left[s] - m, 0), min(right[s] + m + 1, w)
        inside = seg[y0:y1, x0:x1] == s
        mask = Image.fromarray(inside.astype(np.uint8) * 255)
        near = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * RING_MARGIN + 1))) > 0
        ring = (np.asarray(mask.filter(ImageFilter.MaxFilter(2 * m + 1))) > 0) & ~near
        if ring.sum() < 8:
            continue
        gy, gx = np.mgrid[y0:y1, x0:x1]
        design = np.stack([np.ones(ring.sum()), gy[ring], gx[ring]], axis=1).astype(np.float64)
        around = target[y0:y1, x0:x1][ring].astype(np.float64)
        coef, *_ = np.linalg.lstsq(design, around, rcond=None)
        if np.sqrt(((design @ coef - around) ** 2).mean()) > SMOOTH:
            continue  # the segment borders more than one region: no single background behind it
        plane = np.stack([np.ones(inside.sum()), gy[inside], gx[inside]], axis=1) @ coef
        now = target[y0:y1, x0:x1][inside]
        if np.abs(np.median(now, axis=0) - np.median(plane, axis=0)).max() <= MERGE:
            out[y0:y1, x0:x1][inside] = np.clip(plane, 0, 255)
    return out


def _bled(base: np.ndarray, fitted: np.ndarray, seg: np.ndarray, recoloured: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """(count,) the segments whose fitted colour is only a larger recoloured neighbour's blur:
    within BLEED of a blend of their own old colour and that neighbour's new one, with at most
    BLEED_SHARE of the new. An autoencoder blurs a new background into the small objects on it
    (a green triangle on a background turned brown comes back darker), and a refit would paint
    that tint over the whole object; kept, its pixels are the input's again where the blur
    explains them."""
    count = len(whole)
    flat = seg.ravel()
    safe = np.maximum(whole, 1)[:, None]
    old = np.stack([np.bincount(flat, base[..., c].ravel().astype(np.float64), count) for c in range(3)], -1) / safe
    new = np.stack([np.bincount(flat, fitted[..., c].ravel().astype(np.float64), count) for c in range(3)], -1) / safe
    pairs = set()
    for dy, dx in ((0, 1), (1, 0), (0, BLEED_REACH), (BLEED_REACH, 0)):
        for a, b in ((seg, _shifted(seg, dy, dx)), (_shifted(seg, dy, dx), seg)):
            differ = a != b
            pairs.update(np.unique(a[differ].astype(np.int64) * count + b[differ]).tolist())
    if not pairs:
        return np.zeros(count, dtype=bool)
    codes = np.fromiter(pairs, dtype=np.int64)
    small, large = codes // count, codes % count
    keep = recoloured[large] & (whole[large] > whole[small])
    small, large = small[keep], large[keep]
    off, share = _on_blend(new[small], old[small], new[large])
    out = np.zeros(count, dtype=bool)
    out[small[(off <= BLEED) & (share > 0) & (share <= BLEED_SHARE)]] = True
    return out


def _rims(base: np.ndarray, comp: np.ndarray, target: np.ndarray, seg: np.ndarray, solid: np.ndarray, refit: np.ndarray,
          touched: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target with each recoloured edge's antialiasing redone, the touched rim pixels that take it).

    A pixel of a thin segment between two solid ones, whose colour is a blend of theirs (the
    antialiased edge of an object: a fraction t of the object's colour), becomes the same blend
    of their new colours, where either was refitted: the rim of a red circle turned blue is the
    blue circle's rim, exactly. The model's own pixel there goes where it is any blend of the two
    new colours and the old rim colour (the autoencoder redraws an edge a pixel or two off). An
    edge both of whose sides took one colour (a removed object's place and the background
    around it) becomes that colour only where the model drew it so: on an outline style's white
    paper the line the model drew on an edge stays."""
    h, w = seg.shape
    ys, xs = np.nonzero(touched & ~solid[seg])
    out, takes = target.copy(), np.zeros_like(touched)
    if not ys.size:
        return out, takes
    old = base[ys, xs].astype(np.float32)
    best = np.full(ys.size, np.inf)
    lo, hi, frac = np.zeros_like(old), np.zeros_like(old), np.zeros(ys.size, np.float32)
    for r in (1, 2):
        for dy, dx in ((0, r), (r, 0), (r, r), (r, -r)):
            ay, ax = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
            by, bx = np.clip(ys - dy, 0, h - 1), np.clip(xs - dx, 0, w - 1)
            sa, sb = seg[ay, ax], seg[by, bx]
            a_old, b_old = base[ay, ax].astype(np.float32), base[by, bx].astype(np.float32)
            a_new, b_new = target[ay, ax], target[by, bx]
            off, t = _on_blend(old, b_old, a_old)
            edge = (sa != sb) & solid[sa] & solid[sb] & (refit[sa] | refit[sb]) & (t > 0) & (t < 1) & (off <= RIM)
            better = edge & (off < best)
            best = np.where(better, off, best)
            lo[better], hi[better], frac[better] = b_new[better], a_new[better], t[better]
    hit = np.isfinite(best)
    ys, xs, lo, hi, frac, old = ys[hit], xs[hit], lo[hit], hi[hit], frac[hit], old[hit]
    new = lo + frac[:, None] * (hi - lo)
    out[ys, xs] = new
    c = comp[ys, xs]
    one_colour = segments.distance(lo, hi) <= TOLERANCE
    takes[ys, xs] = np.where(one_colour, segments.distance(c, new) <= TOLERANCE, _off_triangle(c, lo, hi, old)[0] <= TOLERANCE)
    return out, takes


def _specks(mask: np.ndarray, smallest: int) -> np.ndarray:
    """The parts of `mask` (4-connected) with fewer than `smallest` pixels."""
    out = np.zeros_like(mask)
    if smallest <= 1 or not mask.any():
        return out
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # labelled there only
    ids = segments.labels(Image.fromarray(mask[box].astype(np.uint8) * 255))
    if ids is None:
        return out
    sizes = np.bincount(ids.ravel())
    out[box] = mask[box] & (sizes[ids] < smallest)
    return out


def snap_edit(base: np.ndarray, edited: np.ndarray, alpha: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """(edited, alpha) to compose instead, or None where snapping does not apply.

    `base` is the input (h, w, 3 uint8), `edited` the model's output resized to it and `alpha`
    (h, w float) how much of each pixel is the model's, as preserve found them; `scale` is
    this size over the model's working size. The returned pair composes as `alpha·edited + (1 − alpha)·base` to the
    snapped picture: alpha is 1 exactly where the snapped pixel differs from the input."""
    h, w = base.shape[:2]
    if h * w > MAX_PIXELS or not (alpha > 0).any():
        return None
    levels = base.astype(np.int16)
    steps = segments.distance(levels[:, 1:], levels[:, :-1])
    if (steps <= FLAT_STD).mean() < FLAT_SHARE:
        return None
    seg = segments.labels(Image.fromarray(base), SEGMENT_STEP)
    if seg is None:
        return None
    count = int(seg.max()) + 1
    a = alpha[..., None].astype(np.float32)
    comp = a * edited.astype(np.float32) + (1 - a) * base.astype(np.float32)
    moves = segments.distance(comp, base) > REPAINTED
    repainted = (alpha >= 0.5) & moves
    if not repainted.any():
        return None

    fitted = _fit(base, comp, seg, repainted, count)
    explained = (segments.distance(comp, fitted) <= TOLERANCE) & repainted
    whole = np.bincount(seg.ravel(), minlength=count)
    shown = np.bincount(seg[repainted], minlength=count)
    fits = np.bincount(seg[explained], minlength=count)
    refit = (shown >= COVER * whole) & (fits >= CONSISTENT * np.maximum(shown, 1))
    # A map that leaves the segment's colour where it was is no recolour: the segment is kept.
    moved = np.bincount(seg.ravel(), segments.distance(fitted, base).ravel(), count) / whole
    refit &= moved > REPAINTED
    # A segment of a few pixels (an antialiased corner, a triangle's tip) is no evidence of a
    # colour map: its fit is whatever the model drew there. Its pixels follow the rules below.
    refit &= whole >= MIN_NEW * scale * scale
    inside = (seg == _shifted(seg, 1, 0)) & (seg == _shifted(seg, -1, 0)) & (seg == _shifted(seg, 0, 1)) & (seg == _shifted(seg, 0, -1))
    solid = np.bincount(seg[inside], minlength=count) >= MIN_NEW * scale * scale
    refit &= ~_bled(base, fitted, seg, refit & solid & (moved > RECOLOURED), whole)
    target = _merged(np.where(refit[seg][..., None], fitted, base.astype(np.float32)), seg, refit)
    touched = (alpha > 0) & moves
    target, rims = _rims(base, comp, target, seg, solid, refit, touched)

    # A touched pixel the colours around it explain takes its segment's colour; one the model
    # moved by no more than REPAINTED is the input's (invisible, as in preserve). The tests run
    # on the touched pixels only: a local edit touches a small share of the picture.
    ys, xs = np.nonzero(touched)
    c, t = comp[ys, xs], target[ys, xs]
    ok = segments.distance(c, t) <= TOLERANCE
    # Part of the way from the input's colour to the segment's new one: the recolour, unevenly
    # drawn. A pixel nearer the input's colour stays the model's: a line drawn in the old colour
    # (an outline style keeps the input's colours at edges), or a spot the model left as it was.
    ok |= _off_blend(c, t, base[ys, xs].astype(np.float32), most_b=0.5) <= TOLERANCE
    reach = max(1, round(REACH * scale))
    # A blend across an edge counts only where one side was recoloured (not merely tinted, as
    # an autoencoder tints white): blur around what the model recoloured (or around what it
    # kept, in what it recoloured). Between two segments it left alone, a band of the other
    # side's colour is a change of outline (an object grown or shrunk), and stays the model's.
    # Only a refitted segment with an inside counts: an antialiased rim (a chain a pixel or two
    # wide, which the autoencoder always redraws) would otherwise take back any new outline
    # drawn within reach of it.
    # Nor is a rim's colour one to blend with: an outline style draws its lines there.
    recoloured = refit & solid & (moved > RECOLOURED)
    # In a segment the model repainted over most of its pixels but in no one colour map, a
    # pixel wholly of the other side's new colour is the model's new outline (an outline style
    # whitens an object's inside), not blur. In one it barely touched, it is the other side's
    # colour spilling over; in one it recoloured, a spot its new colour missed.
    here = seg[ys, xs]
    most = np.where(((shown >= COVER * whole) & ~refit)[here], BLUR_MOST, 1.0)
    for r in sorted({max(1, reach // 2), reach}):
        for dy, dx in ((-r, 0), (r, 0), (0, -r), (0, r), (-r, -r), (-r, r), (r, -r), (r, r)):
            qy, qx = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
            there = seg[qy, qx]
            across = (recoloured[here] | recoloured[there]) & solid[there]
            ok |= across & (_off_blend(c, t, target[qy, qx], most_b=most) <= TOLERANCE)
            # The old colour of what was recoloured, left in that blur: a blend of this pixel's
            # colour, the recoloured side's new colour and its old one. Only where the new colour
            # differs from this side's: a removed or moved object's segment takes the background's
            # colour, and the object drawn again beside it is of its old one.
            far = recoloured[there]
            new = np.where(far[:, None], target[qy, qx], t)
            other = np.where(far[:, None], t, target[qy, qx])
            left = np.flatnonzero(~ok & across & (segments.distance(new, other) > 2 * TOLERANCE))
            if left.size:
                py, px = np.where(far[left], qy[left], ys[left]), np.where(far[left], qx[left], xs[left])
                off, share = _off_triangle(c[left], other[left], new[left], base[py, px].astype(np.float32))
                ok[left] = (off <= TOLERANCE) & (share <= most[left])
    explained_px = np.zeros_like(touched)
    explained_px[ys, xs] = ok
    ok = explained_px | rims
    ok |= _specks(touched & ~ok, round(MIN_NEW * scale * scale))
    out = np.where((touched & ok)[..., None], target, np.where(touched[..., None], comp, base))
    out = np.rint(out).astype(np.uint8)
    changed = (out != base).any(-1)
    return np.where(changed[..., None], out, base), changed.astype(np.float32)
