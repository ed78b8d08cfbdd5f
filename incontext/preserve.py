"""Preservation by construction: the input's own pixels wherever the edit did not happen.

A model redraws the whole picture, through its autoencoder, at its working size. Most of
an edit leaves most of the picture alone, so the output is assembled from two sources:
- where the edit happened, the model's decoded output;
- everywhere else, the input's own pixels, bit for bit, at the input's own size.

Where the edit happened is read from the model's own outputs (for every model, the 12B one
too): per latent pixel, how far the output latent moved from the context latent, relative
to the context latent's RMS (`sampler.change_map`, computed where the latents are). A
region of moved latents is grown and feathered at pixel resolution (`region_alpha`); inside it, pixels the model left within a
few levels of the input are the input's again, which removes the autoencoder's blur from
the grown band without any visible change. A global edit (a background, a look) moves
most latents, so the region covers most of the picture; one that moves them all only a
little (a weak model's night) lowers the threshold to half the median move, so the look is
not cut back to the input. Where the input is a drawing (flat regions), the edit is then
snapped to them (`snap.py`): a recoloured object takes one colour in its own outline, and the
autoencoder's blur across the edges of what it changed is taken back.

    change = sampler.change_map(latents, img_cond, height, width, vae_scale_factor)   # engine side
    out = preserve(edited, change[0], context=fitted_input, source=original, mode="auto")

A client's mask (white: may change, black: must not) narrows the region further: the output
is the model's only where the detected region and the mask agree (region ∧ mask), and the
input's, bit for bit, wherever the mask is black, in both modes ("off" then means: the model's
raw output wherever the mask allows). `fit_mask` brings a mask onto the canvas composed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from incontext import imageio, snap

MODES = ("auto", "off")


@dataclass(frozen=True)
class RegionConfig:
    """How a latent change map becomes a pixel region. Distances are relative to the context
    latent's RMS; the probe of shared/probes measured 0.01–0.08 on untouched background and
    1.0–2.5 on a recoloured object."""

    threshold: float = 0.25
    # A weak model can apply a look to the whole picture while moving every latent by less
    # than `threshold`, though by more than an untouched latent of a local edit moves
    # (docs/preserve.md). When the median latent moved more than this, the edit is global:
    # every latent that moved more than half the median is part of the region.
    global_median: float = 0.08
    grow: int = 4  # pixels of the model's output added around the moved latents
    feather: int = 3  # pixels over which the region fades into the input
    pixel_tolerance: int = 6  # a pixel within this many levels of the input is the input's
    # A pixel within this many levels of the autoencoder's rendering of the input (the context
    # latents decoded), and within twice that rendering's own error there, is one the model
    # did not change: what differs there from the input is the autoencoder's error, e.g. the
    # pale ring it draws around an object, which the band around an edit would otherwise keep.
    rendered_tolerance: int = 20
    # Snap the edit to the input's flat regions where it has them (`snap.py`).
    snap: bool = True


@dataclass
class Preserved:
    image: Image.Image
    mask: Image.Image  # "L", the output's size: 255 where the pixel is the model's, 0 where the input's
    changed_share: float  # the share of output pixels that differ from the input


def _upsample(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a (h, w) bool map to (height, width)."""
    rows = np.arange(height) * mask.shape[0] // height
    cols = np.arange(width) * mask.shape[1] // width
    return mask[rows[:, None], cols[None, :]]


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """A (h, w) bool map grown by `radius` pixels (a square's reach: 8-neighbour steps)."""
    if radius <= 0:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.filter(ImageFilter.MaxFilter(2 * radius + 1))) > 0


def moved_threshold(change: np.ndarray, config: RegionConfig = RegionConfig()) -> float:
    """The change above which a latent counts as moved: `threshold`, or for a global edit (the
    median latent moved more than `global_median`) at most half the median, so a subtle look
    over the whole picture is not cut back to the input."""
    median = float(np.median(change))
    return min(config.threshold, median / 2) if median > config.global_median else config.threshold


def region_alpha(change: np.ndarray, edited: np.ndarray, context: np.ndarray, config: RegionConfig = RegionConfig(),
                 rendered: np.ndarray | None = None) -> np.ndarray:
    """(H, W) float32 in [0, 1]: how much of each output pixel is the model's.

    `change` (h, w) is one image's change map; `edited`, `context` and `rendered` (the
    context's latents decoded, when the engine reports them) are (H, W, 3) uint8 at the
    model's output size."""
    height, width = edited.shape[:2]
    threshold = moved_threshold(change, config)
    moved = _upsample(change > threshold, height, width)
    grown = dilate(moved, config.grow)
    out, ctx = edited.astype(np.int16), context.astype(np.int16)
    differs = np.abs(out - ctx).max(axis=-1) > config.pixel_tolerance
    if rendered is not None and threshold >= config.threshold:
        # The output matches the autoencoder's rendering of the input there, and the rendering
        # is off the input by at least half as much: the difference from the input is the
        # autoencoder's. A slight change (a grey-ish object turned grey) where the rendering
        # is close to the input stays the model's. Not in a subtle global edit (the threshold
        # lowered), where every pixel is the model's to change and its changes are as small as
        # the autoencoder's error: a desaturation that leaves a star's tips as grey as the
        # autoencoder draws them has still desaturated them. A global edit that moves latents
        # far (a new background) keeps the check, which gives its objects back.
        ren = rendered.astype(np.int16)
        own_error = np.abs(ren - ctx).max(axis=-1)
        differs &= np.abs(out - ren).max(axis=-1) > np.minimum(config.rendered_tolerance, 2 * own_error)
    region = grown & differs
    if config.feather <= 0 or not region.any():
        return region.astype(np.float32)
    soft = Image.fromarray(region.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(config.feather / 2))
    alpha = np.maximum(np.asarray(soft, dtype=np.float32) / 255.0, region)
    # The fade stays near the moved latents: further out the model's pixels are only its
    # autoencoder's rendering of what the input already shows.
    alpha[~dilate(moved, config.grow + config.feather)] = 0.0
    return alpha


# Rows blended at once: the float temporaries of a blend are ~16 bytes a pixel, 2 GB for a
# whole 40 MP input at once (bench load: four palette bombs composed together took the server
# to 5.6 GB); in bands of this many rows they stay a few MB.
BAND_ROWS = 128


NOTHING_MAY_CHANGE = "the mask is black everywhere, so nothing may change: white marks where the edit may happen"


def as_mask(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A client's mask image as preserve takes it: grey levels ("L"; white may change), at
    `size` (the edited image's). A mask of another size is stretched to it, NEAREST, so a pixel
    it keeps is never blurred into one that may change. ValueError if it is black everywhere:
    such an edit could only return its input."""
    mask = image.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    if mask.getextrema()[1] == 0:
        raise ValueError(NOTHING_MAY_CHANGE)
    return mask


def fit_mask(mask: Image.Image, width: int, height: int) -> Image.Image:
    """A client's mask ("L", the input's own size) onto a canvas of width × height showing the
    input's centre as `imageio.fit_to_size` does (the same box). NEAREST: each canvas pixel
    takes one mask pixel's value, so a pixel the mask says to keep is never blended with a
    neighbour that may change."""
    if mask.size == (width, height):
        return mask
    box = imageio.crop_box(mask.width, mask.height, width, height)
    return mask.resize((width, height), Image.Resampling.NEAREST, box=box)


def compose(canvas: Image.Image, box: tuple[float, float, float, float], edited: Image.Image, alpha: np.ndarray,
            allowed: Image.Image | None = None, snapped: bool = False) -> Preserved:
    """The canvas with `edited` (which shows `box` of the canvas) blended in by `alpha`, and by
    `allowed` ("L", the canvas's size: 0 keeps the canvas's pixel whatever alpha says, 255 lets
    alpha decide, greys weigh it) when the client sent a mask.

    Where alpha is 0 the canvas's pixels are kept exactly; where it is 1 the (resized) model
    output is taken exactly. `snapped`: the edit is first snapped to the canvas's flat regions
    (`snap.snap_edit`: crisp recolours, the blur around what the model left alone taken back),
    where the canvas has them. Memory: the canvas, the output and the edited region as uint8
    RGB, alpha as float32 over the region, and one band of temporaries."""
    base = np.asarray(canvas.convert("RGB"))
    x0, y0 = round(box[0]), round(box[1])
    bw, bh = round(box[2]) - x0, round(box[3]) - y0
    scale = bw / edited.width
    if (bw, bh) != edited.size:
        edited = edited.resize((bw, bh), Image.Resampling.LANCZOS)
        alpha = np.asarray(Image.fromarray(alpha, mode="F").resize((bw, bh), Image.Resampling.BILINEAR))
    ed = np.asarray(edited.convert("RGB"))
    del edited
    if snapped:
        fitted = snap.snap_edit(base[y0 : y0 + bh, x0 : x0 + bw], ed, alpha, scale)
        if fitted is not None:
            ed, alpha = fitted
    if allowed is not None:
        if allowed.size != canvas.size:
            raise ValueError(f"the mask is {allowed.width}x{allowed.height}, the canvas {canvas.width}x{canvas.height}")
        # Applied at the canvas's own resolution, after alpha is resized to it: a pixel the mask
        # keeps gets alpha 0 exactly, so the band below copies the canvas's pixel untouched.
        weight = np.asarray(allowed.convert("L"))[y0 : y0 + bh, x0 : x0 + bw]
        alpha = alpha * (weight.astype(np.float32) / 255.0)
    out = base.copy()
    mask = np.zeros(base.shape[:2], dtype=np.uint8)
    changed = 0
    for top in range(0, bh, BAND_ROWS):
        rows = slice(top, min(top + BAND_ROWS, bh))
        a = alpha[rows].clip(0.0, 1.0)[..., None]
        e, inside = ed[rows], base[y0 + rows.start : y0 + rows.stop, x0 : x0 + bw]
        blended = np.rint(a * e + (1.0 - a) * inside).astype(np.uint8)
        band = np.where(a >= 1.0, e, np.where(a <= 0.0, inside, blended))
        out[y0 + rows.start : y0 + rows.stop, x0 : x0 + bw] = band
        mask[y0 + rows.start : y0 + rows.stop, x0 : x0 + bw] = np.rint(a[..., 0] * 255).astype(np.uint8)
        changed += int((band != inside).any(axis=-1).sum())
    return Preserved(Image.fromarray(out), Image.fromarray(mask, mode="L"), changed / (base.shape[0] * base.shape[1]))


def changed_share(image: Image.Image, source: Image.Image) -> float:
    """The share of `image`'s pixels that differ from `source` (same size), as Preserved reports
    it: for an output a workflow changed again after preservation (workflows.finish)."""
    a, b = np.asarray(image.convert("RGB")), np.asarray(source.convert("RGB"))
    changed = sum(int((a[top : top + BAND_ROWS] != b[top : top + BAND_ROWS]).any(axis=-1).sum()) for top in range(0, a.shape[0], BAND_ROWS))
    return changed / (a.shape[0] * a.shape[1])


def _rgb(image: Image.Image | None) -> np.ndarray | None:
    return None if image is None else np.asarray(image.convert("RGB"))


def preserve(edited: Image.Image, change: np.ndarray | None, *, context: Image.Image, source: Image.Image | None = None,
             mode: str = "auto", config: RegionConfig = RegionConfig(), mask: Image.Image | None = None,
             rendered: Image.Image | None = None) -> Preserved:
    """One output, preserved.

    `edited` is the model's output and `context` the input as the model saw it (both at the
    model's size); `source` is the input at its own size when the output keeps the input's
    framing (None: compose at the model's size). `rendered` is the context's latents decoded
    (`EditResult.rendered_context`): where the output matches it, the model changed nothing
    and the input's pixel is kept, though the autoencoder's rendering differs from it. mode "off" returns the model's output as it
    is, with the region it detected as the mask.

    `mask` ("L" at the input's own size, or at the canvas's: `fit_mask` brings it there) is
    where the client allows change: the region becomes region ∧ mask, and with mode "off" the
    model's whole output ∧ mask, composed on the canvas like "auto"; the returned mask and
    changed_share are those of the composed region. `change` may be None (an engine that
    reports no change map) only with a mask: the model's whole output ∧ mask, as "off"."""
    if mode not in MODES:
        raise ValueError(f"preserve must be one of {', '.join(MODES)}, not {mode!r}")
    if change is None and mask is None:
        raise ValueError("preserve needs a change map, or a mask to compose by")
    if mask is not None:
        canvas = source if source is not None else context
        allowed = fit_mask(mask, *canvas.size)
        if mode == "off" or change is None:
            alpha = np.ones((edited.height, edited.width), dtype=np.float32)
        else:
            alpha = region_alpha(change, np.asarray(edited.convert("RGB")), np.asarray(context.convert("RGB")), config, _rgb(rendered))
        return compose(canvas, imageio.crop_box(canvas.width, canvas.height, *edited.size), edited, alpha, allowed,
                       snapped=config.snap and mode == "auto" and change is not None)
    alpha = region_alpha(change, np.asarray(edited.convert("RGB")), np.asarray(context.convert("RGB")), config, _rgb(rendered))
    if mode == "off":
        mask = Image.fromarray(np.rint(alpha * 255).astype(np.uint8), mode="L")
        changed = float((np.asarray(edited.convert("RGB")) != np.asarray(context.convert("RGB"))).any(axis=-1).mean())
        return Preserved(edited, mask, changed)
    canvas = source if source is not None else context
    return compose(canvas, imageio.crop_box(canvas.width, canvas.height, *edited.size), edited, alpha, snapped=config.snap)
