"""Workflows: four tasks served under model ids of their own, each one in-context edit by the
default model (the same engine, batching and preservation as any run) with an instruction
written for it, and a result that says what it did.

    object-removal      image_url, prompt ("the red circle")          → the image without it, the removed region's mask
    background-replace  image_url, reference_image_url, prompt?       → the image on the reference's background, its mask
    logo-placement      image_url, logo_image_url, mask_image_url?, prompt? → the image with the logo laid in, where it went (a box)
    segmentation        image_url, prompt ("the red circle")          → a binary mask (0/255) and a box per region: what removing it changes

A workflow is two small steps:

    plan = WORKFLOWS["object-removal"].plan(ObjectRemovalInput(image_url=..., prompt="the red circle"))
    # Plan(prompt="remove the red circle", images=(image_url,), preserve="auto", ...): one edit,
    # which the service submits as a run (submission.prepare) and the CLI runs in process
    finished = finish(plan.workflow, image, mask, source_size=..., placement=...)
    # the output as the workflow promises it: image, mask, boxes (outputs.store calls it)

Boxes are `[x0, y0, x1, y1]` in the output image's pixels, x1 and y1 exclusive (PIL's box).
docs/workflows.md explains each choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from incontext import imageio, outline, preserve, regions, segments
from incontext.engine.protocol import EditRequest, EditResult, EngineClient, ProgressCallback
from incontext.regions import Box

MAX_PROMPT_LENGTH = 4000  # as the runs API's prompt (service/schemas.py)


# 1. What each workflow takes. Unknown fields are ignored, as on every model's input.
class WorkflowInput(BaseModel):
    """The fields every workflow shares with an edit run."""

    model_config = ConfigDict(extra="ignore")

    image_url: str = Field(min_length=1, description="the image: http(s) URL, data: URI, or an output URL of this server")
    seed: int | None = Field(None, ge=0, le=2**62, description="random when absent; reported in the output")
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="default: the model's")
    guidance_scale: float | None = Field(None, ge=1, le=20, description="default: the model's")
    # PNG by default, unlike an edit run: what a workflow keeps of the input is kept bit for bit only in PNG.
    output_format: Literal["png", "jpeg"] = Field("png", description="encoding of the output image; masks are always PNG")
    sync_mode: bool = Field(False, description="the run's own answer carries its images as data URIs; listings give URLs")


class ObjectRemovalInput(WorkflowInput):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_LENGTH, description='what to remove, e.g. "the red circle"')


class BackgroundReplaceInput(WorkflowInput):
    reference_image_url: str = Field(min_length=1, description="the image whose background replaces the input's, as image_url takes one")
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_LENGTH,
                               description="the whole instruction, if the default (replace the background with the one in "
                               "the second image) will not do")


class LogoPlacementInput(WorkflowInput):
    logo_image_url: str = Field(min_length=1, description="the logo, as image_url takes an image; its own pixels are laid in, "
                                "where it is opaque (a PNG's transparency is kept; an opaque logo is a rectangle)")
    mask_image_url: str | None = Field(
        None, min_length=1, validation_alias=AliasChoices("mask_image_url", "mask_url"),
        description="where the logo may go (white; black keeps the input's pixels bit for bit); also read as mask_url. "
        "Absent: the flattest free spot (see docs), reported as outputs[].placement",
    )
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_LENGTH,
                               description="the whole instruction, if the default (put the logo from the second image in "
                               "the <position>) will not do")


class SegmentationInput(WorkflowInput):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_LENGTH, description='what to segment, e.g. "the red circle"')
    output_format: Literal["png"] = Field("png", description="the mask is a PNG")


# 2. The edit (and a second one, `select`), as the service and the CLI run it.
@dataclass(frozen=True)
class Plan:
    """What a workflow asks of the edit."""

    workflow: str
    prompt: str  # may hold "{position}": filled from the placement box once the image is decoded
    images: tuple[str, ...]  # the edited image first, then references, as the input gave them
    fields: tuple[str, ...]  # the input field each image came from, so an error names it
    mask: str | None = None  # where the edit may happen (the existing mask input)
    preserve: Literal["auto", "off"] = "auto"
    place: bool = False  # pick a placement box on the decoded image and allow the edit only there
    backdrop: bool = False  # allow the edit only on the decoded image's backdrop (`backdrop_mask`), when it has one
    # A second edit of the same image, run beside the first: the model's own drawing of a mask
    # of the thing named, which picks among the separate regions the removal changed (`chosen`).
    select: str | None = None


def _thing(text: str) -> str:
    # "the red circle" and "red circle" both become "the red circle" in the instruction.
    words = text.strip().split()
    return " ".join(words[1:] if len(words) > 1 and words[0].lower() in ("the", "a", "an") else words)


def _select(thing: str) -> str:
    # In the bundled model's words for a mask (world/language.py's "segment" templates).
    return f"make a mask of the {thing}"


def plan_object_removal(inp: ObjectRemovalInput) -> Plan:
    # The bundled model learned removal as "remove the {obj}" (world/language.py's templates).
    thing = _thing(inp.prompt)
    return Plan("object-removal", f"remove the {thing}", (inp.image_url,), ("image_url",), select=_select(thing))


def plan_background_replace(inp: BackgroundReplaceInput) -> Plan:
    # The reference is the edit's second image (EditRequest.references). The edit may change
    # only the input's backdrop (`backdrop_mask`), so the subject stays the input's bit for bit;
    # on an input with no plain backdrop, preserve keeps every pixel the model did not change.
    prompt = inp.prompt or "replace the background with the one in the second image"
    return Plan("background-replace", prompt, (inp.image_url, inp.reference_image_url), ("image_url", "reference_image_url"),
                backdrop=True)


def plan_logo_placement(inp: LogoPlacementInput) -> Plan:
    prompt = inp.prompt or "put the logo from the second image in the {position}"
    return Plan("logo-placement", prompt, (inp.image_url, inp.logo_image_url), ("image_url", "logo_image_url"),
                mask=inp.mask_image_url, place=True)


def plan_segmentation(inp: SegmentationInput) -> Plan:
    # The mask is what removing the thing changes (`removed_mask`): an editor finds the thing a
    # prompt names best when asked to remove it (docs/workflows.md has the measurements), and
    # with preserve auto every pixel it leaves alone is the input's, so the change is exact.
    thing = _thing(inp.prompt)
    return Plan("segmentation", f"remove the {thing}", (inp.image_url,), ("image_url",), select=_select(thing))


@dataclass(frozen=True)
class Workflow:
    id: str
    description: str
    input: type[WorkflowInput]
    plan: Callable[..., Plan]
    # One edit's compute at the model's working size, as a run of the default model.
    price_per_image: Decimal = Decimal("0.04")
    results: str = ""  # what outputs[] carries besides url, for the spec pages
    # The model's true CFG (EditRequest.true_cfg): off where it overshoots the workflow's own
    # instruction, drawing a removed thing's fill or a logo's surroundings off the input (docs/workflows.md).
    true_cfg: bool = True


WORKFLOWS: dict[str, Workflow] = {w.id: w for w in (
    Workflow("object-removal", "removes what the prompt names; the rest of the image stays the input's, bit for bit",
             ObjectRemovalInput, plan_object_removal,
             results="`mask_url`: the removed region (255 where the pixels are the model's); `boxes`: its bounding box",
             true_cfg=False),
    Workflow("background-replace", "puts the subject on the background of a reference image; what the model left alone stays "
             "the input's, bit for bit", BackgroundReplaceInput, plan_background_replace,
             results="`mask_url`: the replaced region; `boxes`: its bounding boxes"),
    Workflow("logo-placement", "places a logo image, its own pixels (a PNG's transparency kept), inside a mask, or on the "
             "flattest free spot it picks",
             LogoPlacementInput, plan_logo_placement,
             results="`placement`: the box the logo was allowed in (the mask's bounding box, or the spot picked); "
             "`mask_url`: the pixels changed; `boxes`: their bounding boxes", true_cfg=False),
    Workflow("segmentation", "a binary mask of what the prompt names (the pixels removing it changes), and a box per "
             "separate region", SegmentationInput, plan_segmentation,
             results="`url` and `mask_url`: the mask, a PNG of only 0 and 255 at the input's size; `boxes`: one per "
             "separate white region, largest first", true_cfg=False),  # its mask is what the removal changes
)}


# 3. Logo placement: a free spot, and the prompt's position word.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# Where a logo usually goes first: corners, then edges, the centre last. Ties in flatness keep this order.
PLACEMENT_ORDER = ("bottom right", "bottom left", "top right", "top left", "bottom", "top", "right", "left", "center")
LOGO_SHARE = 4  # the logo fits in a box a quarter of the image's width and height
MARGIN_SHARE = 32  # and stays 1/32 of the shorter side away from the edges


def placement(image: Image.Image, logo_size: tuple[int, int]) -> Box:
    """The flattest of nine candidate spots (corners, edges, centre) for a logo of `logo_size`
    scaled into a quarter of the image's width and height: the one whose pixels vary least
    (standard deviation of luminance), so the logo covers the least detail. Deterministic."""
    w, h = image.size
    scale = min(w / LOGO_SHARE / logo_size[0], h / LOGO_SHARE / logo_size[1])
    bw, bh = max(1, round(logo_size[0] * scale)), max(1, round(logo_size[1] * scale))
    margin = min(w, h) // MARGIN_SHARE
    xs = {"left": margin, "center": (w - bw) // 2, "right": w - bw - margin}
    ys = {"top": margin, "center": (h - bh) // 2, "bottom": h - bh - margin}
    # Measured on a small grey copy: the choice needs the flatness, not every pixel of 40 MP.
    factor = max(1.0, max(w, h) / 256)
    grey = np.asarray(image.convert("L").resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BOX),
                      dtype=np.float32)
    best, best_std = None, None
    for name in PLACEMENT_ORDER:
        words = name.split()
        x0 = xs[next((w for w in words if w in ("left", "right")), "center")]
        y0 = ys[next((w for w in words if w in ("top", "bottom")), "center")]
        sx0, sy0 = int(x0 / factor), int(y0 / factor)
        patch = grey[sy0 : max(sy0 + 1, int((y0 + bh) / factor)), sx0 : max(sx0 + 1, int((x0 + bw) / factor))]
        std = float(patch.std())
        if best_std is None or std < best_std - 1e-6:
            best, best_std = [x0, y0, x0 + bw, y0 + bh], std
    return best


def position_name(box: Box, size: tuple[int, int]) -> str:
    """The position word (world/language.py's) of a box's centre in a 3 × 3 grid of the image."""
    cx, cy = (box[0] + box[2]) / 2 / size[0], (box[1] + box[3]) / 2 / size[1]
    return POSITIONS[min(2, int(cy * 3)) * 3 + min(2, int(cx * 3))]


def box_mask(size: tuple[int, int], box: Box) -> Image.Image:
    """A mask ("L", `size`) white inside `box`: the edit may happen only there."""
    mask = Image.new("L", size, 0)
    mask.paste(255, tuple(box))
    return mask


def mask_box(mask: Image.Image) -> Box | None:
    """The bounding box of a mask's non-black pixels; None if it has none."""
    return list(mask.getbbox()) if mask.getbbox() else None


# The logo itself goes onto the image (`place_logo`): an editor redraws what it places
# through its autoencoder, which blurs a small emblem past reading (nano's round trip of one
# keeps 5 % legible, docs/workflows.md), while the logo's own pixels are exact. Its
# transparent pixels leave the image's; an opaque logo is placed whole, as a rectangle.


def place_logo(image: Image.Image, logo: Image.Image, box: Box, allowed: Image.Image | None = None) -> tuple[Image.Image, np.ndarray]:
    """`image` with `logo` (RGB, or RGBA to keep its transparency) scaled to fit `box` (inside
    the image; its aspect kept, centred) and laid over it, and where it landed ((h, w) bool).
    Nothing changes where `allowed` (an "L" mask at the image's size) is black, so a client's
    mask holds bit for bit: the blend is preservation's own (preserve.compose)."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    scale = min(bw / logo.width, bh / logo.height)
    fw, fh = max(1, round(logo.width * scale)), max(1, round(logo.height * scale))
    x0, y0 = box[0] + (bw - fw) // 2, box[1] + (bh - fh) // 2
    # Pillow resizes RGBA premultiplied, so what is transparent does not bleed into the edge.
    fitted = logo.convert("RGBA").resize((fw, fh), Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
    alpha = np.asarray(fitted.getchannel("A"), np.float32) / 255
    laid = preserve.compose(image, (x0, y0, x0 + fw, y0 + fh), fitted.convert("RGB"), alpha, allowed)
    return laid.image, np.asarray(laid.mask) > 0


# 4. Background replacement: the backdrop, found on the input. A subject photographed on a
# backdrop (a plain or gently graded studio sweep, the world's backgrounds) is whatever is not
# that backdrop's colour where it stands: the colour is fitted to the image's border as a
# plane in x and y per channel, refitted without the border pixels off it by more than
# BACKDROP_TOLERANCE (a subject touching the edge), and a pixel that close to the plane is
# backdrop. An input whose border does not fit (a scene, a pattern) has no backdrop.
BACKDROP_TOLERANCE = 24  # levels per RGB channel, as segments.TOLERANCE
MIN_BORDER_FIT = 0.6  # of the border's pixels on the plane
MIN_BACKDROP_SHARE = 0.1  # of the image's pixels
_BAND_PIXELS = 1 << 20  # rows tested at a time: a 40 MP input never holds its plane whole


def backdrop_mask(image: Image.Image) -> Image.Image | None:
    """An "L" mask (0/255, the image's size) of the image's backdrop grown by one pixel, so the
    subject's antialiased rim, half old backdrop, may change with it; None when it has none."""
    rgb = np.asarray(image.convert("RGB"))
    h, w, _ = rgb.shape
    ys = np.concatenate([np.zeros(w), np.full(w, h - 1), np.arange(h), np.arange(h)])
    xs = np.concatenate([np.arange(w), np.arange(w), np.zeros(h), np.full(h, w - 1)])
    colours = rgb[ys.astype(int), xs.astype(int)].astype(np.float64)
    design = np.stack([np.ones_like(xs), xs / max(1, w - 1), ys / max(1, h - 1)], 1)
    on = np.ones(len(xs), bool)
    for _ in range(3):
        if on.sum() < 3:
            return None
        plane = np.linalg.lstsq(design[on], colours[on], rcond=None)[0]  # (3 terms, 3 channels)
        on = np.abs(colours - design @ plane).max(1) <= BACKDROP_TOLERANCE
    if on.mean() < MIN_BORDER_FIT:
        return None
    backdrop = np.zeros((h, w), bool)
    gx = (np.arange(w) / max(1, w - 1))[:, None] * plane[1] + plane[0]  # (w, 3)
    band = max(1, _BAND_PIXELS // w)
    for y0 in range(0, h, band):
        rows = np.arange(y0, min(h, y0 + band))
        expected = gx[None] + (rows / max(1, h - 1))[:, None, None] * plane[2]
        backdrop[rows] = segments.distance(rgb[rows].astype(np.float32), expected.astype(np.float32)) <= BACKDROP_TOLERANCE
    if backdrop.mean() < MIN_BACKDROP_SHARE:
        return None
    return Image.fromarray(np.where(backdrop, 255, 0).astype(np.uint8), mode="L").filter(ImageFilter.MaxFilter(3))


# 5. The second edit (Plan.select), beside the first on the same engine.
def select_id(request_id: str) -> str:
    """The engine request id of a run's second edit."""
    return f"{request_id}/select"


@dataclass(frozen=True)
class Drawn:
    """The thing's mask a plan's `select` request came back with (white on black, at the
    model's working size): `picked` where the model's selector picked it among the input's
    segments (EditResult.selected), so it lies on the input's edges; else the model drew it."""

    image: Image.Image
    picked: bool = False


# Workflows whose answer is the thing's mask alone: where the model's selector picks the thing,
# the edit beside the mask request (a segmentation's removal) would go unused, so it is cancelled.
MASK_ANSWERS = frozenset({"segmentation"})


async def edit_with_select(engine: EngineClient, request: EditRequest, select: str | None,
                           on_progress: ProgressCallback | None = None, *, mask_answers: bool = False) -> tuple[EditResult, Drawn | None]:
    """(the edit's result, the `select` request's mask or None). With `select` the two requests
    go to the engine together, so they share its batches (same input and seed; one image, no
    previews, preserve off; a mask request, which a model with a selector answers without
    denoising); if either fails, the other is cancelled and the failure raised. With
    `mask_answers` (MASK_ANSWERS), a mask the selector picked ends it: the edit is cancelled at
    its next step and the mask request's result is returned as the edit's."""
    main = engine.edit(request, on_progress=on_progress)
    if select is None:
        return await main, None
    second = replace(request, request_id=select_id(request.request_id), prompt=select, num_images=1, previews=0,
                     parent_request_id=None, render_context=False, thing_mask=True)
    tasks = [asyncio.ensure_future(main), asyncio.ensure_future(engine.edit(second))]
    try:
        if mask_answers and (picked := await tasks[1]).selected:
            engine.cancel(request.request_id)
            await asyncio.gather(tasks[0], return_exceptions=True)
            return picked, Drawn(picked.images[0], picked=True)
        result, drawn = await asyncio.gather(*tasks)
    except BaseException:
        for job, task in zip((request, second), tasks):
            if not task.done():
                engine.cancel(job.request_id)
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return result, Drawn(drawn.images[0], drawn.selected)


# 6. The result, as each workflow promises it.
@dataclass
class Finished:
    image: Image.Image
    mask: Image.Image | None
    extra: dict = field(default_factory=dict)  # goes into the output item: boxes, placement


def finish(workflow: str, image: Image.Image, mask: Image.Image | None, *, source_size: tuple[int, int],
           placement_box: Box | None = None, source: Image.Image | None = None, logo: Image.Image | None = None,
           allowed: Image.Image | None = None, drawn: Drawn | None = None) -> Finished:
    """One output of `workflow`: `image` and `mask` as preservation made them (preserve.preserve:
    "L", 255 where the pixel is the model's), the input's own size `source_size`; `source`, the
    input itself, which a segmentation and a removal need (what removal changed is where the
    output differs from it); `drawn`, the plan's `select` request's mask of the thing: picked by
    the model's selector, it is the thing (a segmentation's mask; a removal changes nothing off
    it, and where a plane fits the ring around it, the thing's place takes that plane, the
    background behind it, whatever the model drew), drawn by the model, it picks among the
    removed regions; `logo` and `allowed` (where the run
    could change pixels), which a logo placement lays the logo's own pixels in with."""
    if workflow == "segmentation":
        if source is None:
            raise ValueError("a segmentation's mask needs the input it was made from")
        binary = picked_thing(drawn, source)
        if binary is None:
            removed = np.asarray(removed_mask(image, source)) > 0
            binary = chosen(removed, drawn_mask(drawn.image, source.size)) if drawn is not None else removed
        out = _onto(binary, source.size, (0, 0, *source.size))
        return Finished(out, out, {"boxes": regions.boxes(binary)})
    if workflow == "object-removal" and drawn is not None and source is not None and image.size == source.size:
        thing = picked_thing(drawn, source)
        if thing is None:
            image, mask = _keep_unchosen(image, mask, source, drawn.image)
        elif (filled := outline.fill_behind(source, thing, UNDO_MARGIN)) is not None:
            image, region = filled  # a drawing's background behind the thing: the plane around it, exactly
            mask = Image.fromarray(np.where(region, 255, 0).astype(np.uint8), mode="L")
        else:
            image, mask = _only_on(thing, image, mask, source)
    if workflow == "logo-placement" and logo is not None and placement_box is not None:
        image, landed = place_logo(image, logo, placement_box, allowed)
        laid = np.where(landed, 255, 0).astype(np.uint8)
        mask = Image.fromarray(laid if mask is None else np.maximum(laid, np.asarray(mask.convert("L"))), mode="L")
    extra = {"boxes": regions.boxes(np.asarray(mask) > 0) if mask is not None else []}
    if workflow == "logo-placement":
        extra["placement"] = placement_box
    return Finished(image, mask, extra)


CHANGED = 24  # levels (per RGB channel): a pixel the removal changed by more is the thing's, as segments.TOLERANCE splits segments
SNAP_MARGIN = 8  # pixels around the changed ones in which the segments are judged


def removed_mask(output: Image.Image, source: Image.Image) -> Image.Image:
    """The segmentation's mask ("L", 0/255, the source's size): the pixels of `output` (the
    removal's result) that differ from the input by more than CHANGED levels, snapped to the
    input's edges (segments.snap) in their bounding box, so a model's blocky fill takes the
    thing's own outline and a stray speck of redrawn background drops out. An output at the
    model's working size is compared with the part of the input the model saw."""
    x0, y0, x1, y1 = (round(v) for v in imageio.crop_box(*source.size, *output.size))
    seen = source if source.size == output.size else source.crop((x0, y0, x1, y1)).resize(output.size, Image.Resampling.BOX)
    before, after = np.asarray(seen.convert("RGB"), np.int16), np.asarray(output.convert("RGB"), np.int16)
    diff = np.abs(after - before).max(axis=-1).astype(np.uint8)
    # An antialiased edge pixel changes by the share of it the thing covered: it is the thing's
    # where that share is a half or more of what its most changed neighbour moved (as the
    # world's own masks count a pixel over half covered).
    most = np.asarray(Image.fromarray(diff).filter(ImageFilter.MaxFilter(3)))
    changed = (diff > CHANGED) & (2 * diff.astype(np.int16) >= most)
    if changed.any():  # snapped in the changed pixels' box only: the cost follows the thing, not a 40 MP input
        ys, xs = np.nonzero(changed)
        top, left = max(0, ys.min() - SNAP_MARGIN), max(0, xs.min() - SNAP_MARGIN)
        bottom, right = ys.max() + SNAP_MARGIN + 1, xs.max() + SNAP_MARGIN + 1
        part = Image.fromarray(before[top:bottom, left:right].astype(np.uint8))
        changed[top:bottom, left:right] = segments.snap(part, changed[top:bottom, left:right])
    return _onto(changed, source.size, (x0, y0, x1, y1))


# The model's drawn mask picks among the regions a removal changed: a removal also takes
# things that share a word with the one named ("remove the yellow heart" takes a yellow
# triangle too), and the two edits err on different things (docs/workflows.md).
DRAWN_LEVEL = 128  # the drawn mask is its pixels at mid-grey or lighter
MIN_COVER = 0.25  # a drawn mask covering less of every region says nothing: all are kept
COVER_SHARE = 0.5  # a region is kept when the drawn mask covers at least half as much of it as of the best


def drawn_mask(drawn: Image.Image, source_size: tuple[int, int]) -> np.ndarray:
    """(h, w) bool at the source's size: the `select` edit's output (at the model's working
    size, what the model saw of the source) at mid-grey or lighter."""
    light = np.asarray(drawn.convert("L")) >= DRAWN_LEVEL
    box = tuple(round(v) for v in imageio.crop_box(*source_size, *drawn.size))
    return np.asarray(_onto(light, source_size, box)) > 0


def chosen(removed: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """The separate 4-connected regions of `removed` (bool) that `drawn` (bool, same shape)
    covers for at least COVER_SHARE of the best-covered region's share; all of them when the
    drawn mask covers none for MIN_COVER."""
    labels, count = regions.label(removed)
    if count < 2:
        return removed
    ids = labels.ravel()
    cover = np.bincount(ids, weights=drawn.ravel().astype(np.float64), minlength=count + 1)[1:] / np.bincount(ids, minlength=count + 1)[1:]
    best = cover.max()
    if best < MIN_COVER:
        return removed
    keep = np.concatenate([[False], cover >= COVER_SHARE * best])
    return keep[labels]


UNDO_MARGIN = 2  # pixels around a region not chosen that go back to the input: its faint antialiased rim


def _keep_unchosen(image: Image.Image, mask: Image.Image | None, source: Image.Image, drawn: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """A removal's output with the input's pixels back on the removed regions the drawn mask
    did not choose (and UNDO_MARGIN around them, away from the chosen ones), and its mask less them."""
    removed = np.asarray(removed_mask(image, source)) > 0
    keep = chosen(removed, drawn_mask(drawn, source.size))
    dropped = removed & ~keep
    if not dropped.any():
        return image, mask
    undo = preserve.dilate(dropped, UNDO_MARGIN) & ~preserve.dilate(keep, UNDO_MARGIN)
    back = Image.fromarray(np.where(undo, 255, 0).astype(np.uint8), mode="L")
    image = Image.composite(source.convert(image.mode), image, back)
    if mask is not None:
        mask = Image.fromarray(np.where(undo, 0, np.asarray(mask.convert("L"))).astype(np.uint8), mode="L")
    return image, mask


def picked_thing(drawn: Drawn | None, source: Image.Image) -> np.ndarray | None:
    """(h, w) bool at the input's size: the thing the model's selector picked, on the input's
    edges with its antialiased rim (outline.outline); None where the model drew the mask, or
    it holds nothing, or the input is not a drawing there."""
    if drawn is None or not drawn.picked:
        return None
    thing = outline.outline(source, drawn_mask(drawn.image, source.size))
    return thing if thing is not None and thing.any() else None


def _only_on(thing: np.ndarray, image: Image.Image, mask: Image.Image | None, source: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """A removal's output with the input's pixels everywhere but on the thing and UNDO_MARGIN
    around it (what the fill blurs past its rim), and its mask there only: whatever else the
    model changed (another thing alike in a word, a shifted background) is the input's again."""
    there = preserve.dilate(thing, UNDO_MARGIN)
    image = Image.composite(image, source.convert(image.mode), Image.fromarray(np.where(there, 255, 0).astype(np.uint8), mode="L"))
    if mask is not None:
        mask = Image.fromarray(np.where(there, np.asarray(mask.convert("L")), 0).astype(np.uint8), mode="L")
    return image, mask


def _onto(binary: np.ndarray, source_size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """A (h, w) bool map of what the model saw as an "L" 0/255 mask of the input's own size:
    NEAREST keeps it binary, and 0 outside what the model saw."""
    mask = Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), mode="L")
    if mask.size == source_size:
        return mask
    out = Image.new("L", source_size, 0)
    out.paste(mask.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.NEAREST), box[:2])
    return out
