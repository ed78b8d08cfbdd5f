"""Programmatic checks of one edit: did the requested change happen, and what is its PSNR.

The world's scene data says where every object is and what colour it should be, so each
family is checked by asking the output the question a person would ask of it:

- recolor: is the object (its eroded region) now the requested colour?
- remove: does the object's region look like what was behind it rather than like the object?
- add: is there something of the requested colour where the object was asked for?
- move: is the object at its new place, and is its old place no longer showing it?
- background: is the background, away from the objects, the requested colour?
- grayscale: where the input had colour, has the output none?
- resize, replace: does the object's new outline show its colour, and is what it no longer
  covers showing what was behind it? For replace, is the requested shape the one that fits?
- texture: is the background the requested colour, and its motifs the requested other colour?
- invert, pixelate: did the pixels that change go the target's way?
- night, pastel: that too, and did the image get at least half as much darker (night) or
  lighter and less colourful (pastel) as asked?
- outline: that too, and is it dark lines on white paper where the target has them?
- text: of all colour names written in the word's place, does the requested one fit the
  output best, in the requested colour?
- creature: where it was asked to be, does each of its traits (body, eyes, markings,
  accessory) show in its colour, is each the target's kind rather than another (a crown
  for its hat, three eyes for two), and is the background the requested colour? Shapes asked
  for beside it: on some spot beside it (the instruction names no side), is each in its colour,
  and of all shapes drawn there, does the requested one fit best?
- bgref: does the background, away from the objects, look like the second image's (the target's)?
- emblem: where it was asked for, are the emblem's outer and inner shapes in their colours?
- segment: does the output, split at mid-grey, cover the object's exact mask (IoU)?

and, for every family, the rest of the image is preserved reasonably (`PRESERVE_MIN_DB`); a family
that repaints every pixel (`WHOLE_IMAGE`) must instead stay that close to the target.
All functions are pure: images in, numbers or booleans out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from PIL import Image

from incontext.world.character import BESIDE_SIZE, SHAPE_REACH, beside_spots
from incontext.world.creature import ACCESSORIES, BODIES, EYES, MARKINGS
from incontext.world.edits import Example
from incontext.world.workflows import exact_mask
from incontext.world.scene import (
    COLORS, ROTATED_SHAPES, SHAPES, Scene, Shape, creature_masks, object_mask, pattern_mask, render, word_mask,
)

# Preservation outside the edit mask: RMS error ≈ 25 levels. Loose enough for an
# autoencoder's blur, strict enough that repainting the scene fails.
PRESERVE_MIN_DB = 20.0
CLEAR_DIFF = 24  # levels (max over channels) for a pixel to count as clearly changed
TOWARD_TARGET = 0.75  # fraction of a region that must look more like the target than the input
COLORLESS = 20.0  # mean chroma (max − min channel) of a colourless region: σ≈10 noise per channel gives ≈17
ERODE = 1  # pixels peeled off a region: antialiased rims are a mix of two colours
OBJECT_MARGIN = 2  # pixels around objects left out of the background
CREATURE_TRAITS = {"body": BODIES, "eyes": EYES, "marking": MARKINGS, "accessory": ACCESSORIES}
MIN_TRAIT_PIXELS = 3  # a trait cut down to fewer pixels than this (at the image border) is not asked about
HALF_WAY = 0.5  # a look's overall change (luminance, chroma) must reach this fraction of the target's
# A mask image repaints every pixel too (segment).
WHOLE_IMAGE = ("grayscale", "invert", "night", "outline", "pixelate", "pastel", "segment")
SEGMENT_MIN_IOU = 0.8  # of the output's white (over mid-grey) and the object's exact mask


# ---------------------------------------------------------------- metrics


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)


def mse(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error in 0–255 levels over the pixels in `mask` (all if None); nan if it is empty."""
    sq = ((_array(a) - _array(b)) ** 2).mean(axis=2)
    values = sq if mask is None else sq[mask]
    return float(values.mean()) if values.size else math.nan


def db(mse_value: float) -> float:
    """PSNR in dB for a mean squared error: inf for identical images, nan for no pixels."""
    if math.isnan(mse_value):
        return math.nan
    return math.inf if mse_value == 0 else 10 * math.log10(255.0**2 / mse_value)


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> float:
    return db(mse(a, b, mask))


def preservation_psnr(example: Example, output: Image.Image) -> float:
    """PSNR to the input outside the edit mask: how much of what should stay, stayed."""
    return psnr(output, example.context, ~example.mask)


# ---------------------------------------------------------------- regions


def erode(mask: np.ndarray, r: int = ERODE) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        m = out.copy()
        m[1:] &= out[:-1]
        m[:-1] &= out[1:]
        m[:, 1:] &= out[:, :-1]
        m[:, :-1] &= out[:, 1:]
        m[0], m[-1], m[:, 0], m[:, -1] = False, False, False, False
        out = m
    return out


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    return ~erode(~mask, r)


def visible_mask(scene: Scene, index: int) -> np.ndarray:
    """Where object `index` shows: its shape minus the objects drawn over it."""
    mask = object_mask(scene, index)
    for later in range(index + 1, len(scene.objects)):
        mask &= ~object_mask(scene, later)
    return mask


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask without its antialiased rim, unless that leaves nothing (a thin star)."""
    core = erode(mask)
    return core if core.any() else mask


def clearly_changed(example: Example) -> np.ndarray:
    diff = np.abs(_array(example.context) - _array(example.target)).max(axis=2)
    return diff > CLEAR_DIFF


# ---------------------------------------------------------------- colour


def median_rgb(image: Image.Image, region: np.ndarray) -> np.ndarray:
    return np.median(_array(image)[region], axis=0)


def nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda name: float(((rgb - np.array(COLORS[name])) ** 2).sum()))


def is_color(image: Image.Image, region: np.ndarray, color: str) -> bool:
    """Whether the region's median colour is closer to `color` than to any other named colour."""
    return bool(region.any()) and nearest_color(median_rgb(image, region)) == color


def toward_target(example: Example, output: Image.Image, region: np.ndarray) -> bool:
    """Whether most of the region looks more like the target than like the input: the change
    happened there. The unchanged input never passes; the target always does."""
    if not region.any():
        return False
    out = _array(output)[region]
    to_target = np.abs(out - _array(example.target)[region]).sum(axis=1)
    to_input = np.abs(out - _array(example.context)[region]).sum(axis=1)
    return float((to_target < to_input).mean()) >= TOWARD_TARGET


def chroma(image: Image.Image) -> np.ndarray:
    """Per-pixel max − min channel in levels: 0 for grays, large for saturated colours."""
    a = _array(image)
    return a.max(axis=2) - a.min(axis=2)


# ---------------------------------------------------------------- families


def _recolor(ex: Example, output: Image.Image) -> bool:
    region = _core(visible_mask(ex.target_scene, ex.info["index"]))
    return is_color(output, region, ex.info["color"])


def _remove(ex: Example, output: Image.Image) -> bool:
    region = visible_mask(ex.scene, ex.info["index"]) & clearly_changed(ex)
    return toward_target(ex, output, _core(region))


def _add(ex: Example, output: Image.Image) -> bool:
    region = _core(visible_mask(ex.target_scene, ex.info["index"]))
    return is_color(output, region, ex.info["color"]) and toward_target(ex, output, region & clearly_changed(ex))


def _move(ex: Example, output: Image.Image) -> bool:
    i = ex.info["index"]
    new, old = visible_mask(ex.target_scene, i), visible_mask(ex.scene, i)
    arrived = _core(new & ~old)
    left = _core(old & ~dilate(new, OBJECT_MARGIN)) & clearly_changed(ex)
    return (
        is_color(output, arrived, ex.scene.objects[i].color)
        and toward_target(ex, output, arrived & clearly_changed(ex))
        and toward_target(ex, output, left)
    )


def _reshaped(ex: Example, output: Image.Image) -> bool:
    """An object changed outline in place (resize, replace): its new region has its (new) colour,
    and where old and new outlines differ, the output went the target's way."""
    i = ex.info["index"]
    new, old = visible_mask(ex.target_scene, i), visible_mask(ex.scene, i)
    gained = _core(new & ~old)
    lost = _core(old & ~dilate(new, OBJECT_MARGIN))
    changed = (gained | lost) & clearly_changed(ex)
    return is_color(output, _core(new), ex.target_scene.objects[i].color) and toward_target(ex, output, changed)


def _replace(ex: Example, output: Image.Image) -> bool:
    """As `_reshaped`, and of all shapes drawn in its place, the requested one fits the output best:
    a circle where a heart was asked has the heart's colour but not its outline."""
    i = ex.info["index"]
    obj = ex.target_scene.objects[i]
    behind = _array(render(ex.target_scene.without(i)))
    out = _array(output)
    ink = np.abs(out - np.array(obj.rgb)).sum(axis=2) < np.abs(out - behind).sum(axis=2)

    def fit(kind: str) -> float:
        candidate = replace(obj, kind=kind, angle=obj.angle if kind in ROTATED_SHAPES else 0.0)
        mask = visible_mask(ex.target_scene.with_object(i, candidate), i)
        return float((ink & mask).sum()) / max(1, int((ink | mask).sum()))

    return _reshaped(ex, output) and max(SHAPES, key=fit) == ex.info["kind"]


def _background(ex: Example, output: Image.Image) -> bool:
    region = ~dilate(_object_pixels(ex), OBJECT_MARGIN)
    return is_color(output, region, ex.info["color"]) and toward_target(ex, output, region & clearly_changed(ex))


def _object_pixels(ex: Example) -> np.ndarray:
    objects = np.zeros((ex.scene.height, ex.scene.width), dtype=bool)
    for scene in (ex.scene, ex.target_scene):
        for i in range(len(scene.objects)):
            objects |= object_mask(scene, i)
    return objects


def _texture(ex: Example, output: Image.Image) -> bool:
    background = ~dilate(_object_pixels(ex), OBJECT_MARGIN)
    motifs = pattern_mask(ex.target_scene)
    base, motif = erode(background & ~motifs, 2), _core(background & motifs)
    return (
        is_color(output, base, ex.info["color"])
        and is_color(output, motif, ex.info["pattern_color"])
        and toward_target(ex, output, background & clearly_changed(ex))
    )


def luminance(image: Image.Image | np.ndarray) -> np.ndarray:
    return _array(image) @ np.array([0.299, 0.587, 0.114])


def _half_way(before: float, asked: float, got: float) -> bool:
    """Whether `got` moved from `before` at least HALF_WAY of the way to `asked`."""
    return (got - before) * np.sign(asked - before) >= HALF_WAY * abs(asked - before) > 0


def _restyled(ex: Example, output: Image.Image) -> bool:
    return toward_target(ex, output, clearly_changed(ex))


def _night(ex: Example, output: Image.Image) -> bool:
    darker = _half_way(luminance(ex.context).mean(), luminance(ex.target).mean(), luminance(output).mean())
    return darker and _restyled(ex, output)


def _pastel(ex: Example, output: Image.Image) -> bool:
    lighter = _half_way(luminance(ex.context).mean(), luminance(ex.target).mean(), luminance(output).mean())
    softer = _half_way(chroma(ex.context).mean(), chroma(ex.target).mean(), chroma(output).mean())
    return lighter and softer and _restyled(ex, output)


def _outline(ex: Example, output: Image.Image) -> bool:
    target, seen = luminance(ex.target), luminance(output)
    lines, paper = target < 128, erode(target > 200, 2)
    if not lines.any() or not paper.any():
        return False
    on_paper = nearest_color(median_rgb(output, paper)) == "white"
    return on_paper and np.median(seen[lines]) < np.median(seen[paper]) - 80 and _restyled(ex, output)


def _text(ex: Example, output: Image.Image) -> bool:
    """The word reads as asked: its letters have the word's colour, and among all the words it
    could be, the requested one's letters match the coloured pixels best."""
    word = ex.target_scene.words[0]
    letters = word_mask(ex.target_scene, 0)
    behind = _array(render(replace(ex.target_scene, words=())))
    out = _array(output)
    ink = np.abs(out - np.array(word.rgb)).sum(axis=2) < np.abs(out - behind).sum(axis=2)

    def fit(text: str) -> float:
        mask = word_mask(replace(ex.target_scene, words=(replace(word, text=text),)), 0)
        return float((ink & mask).sum()) / max(1, int((ink | mask).sum()))

    return is_color(output, _core(letters), word.color) and max(COLORS, key=fit) == word.text


def _trait_fits(ex: Example, output: Image.Image, trait: str) -> bool:
    """Of the creatures that differ from the target's only in `trait` (say, a crown instead of
    its hat), the target's is the one the output is closest to, where they differ."""
    c = ex.target_scene.creature
    values = CREATURE_TRAITS[trait]
    drawn = [_array(render(replace(ex.target_scene, creature=replace(c, **{trait: v})))) for v in values]
    truth = drawn[values.index(getattr(c, trait))]
    region = np.logical_or.reduce([np.abs(d - truth).max(axis=2) > CLEAR_DIFF for d in drawn])
    errors = [mse(output, d, region) for d in drawn]
    return int(np.argmin(errors)) == values.index(getattr(c, trait))


def _creature(ex: Example, output: Image.Image) -> bool:
    c = ex.target_scene.creature
    parts = creature_masks(ex.target_scene)
    eyes = parts["eyes"] | parts["pupils"]  # white with a small pupil: white, as a whole
    traits = [(parts["body"], c.color), (parts["marking"], c.marking_color), (eyes, "white"), (parts["accessory"], c.accessory_color)]
    cores = [(_core(region), color) for region, color in traits]
    if not all(is_color(output, core, color) for core, color in cores if core.sum() >= MIN_TRAIT_PIXELS):
        return False
    if not all(_trait_fits(ex, output, trait) for trait in CREATURE_TRAITS):
        return False
    if "color" in ex.info:
        creatures = np.logical_or.reduce([*parts.values(), *creature_masks(ex.scene).values()])
        background = ~dilate(_object_pixels(ex) | creatures, OBJECT_MARGIN)
        if not is_color(output, background, ex.info["color"]):
            return False
    if "added" in ex.info:  # beside it: on any spot beside it, not only where the target has them
        return all(_beside(ex, output, i) for i in ex.info["added"])
    return toward_target(ex, output, clearly_changed(ex))


def _shape_alone(scene: Scene, shape: Shape) -> np.ndarray:
    """Boolean (h, w) mask of `shape` drawn in `scene`'s frame."""
    return object_mask(replace(scene, objects=(shape,)), 0)


def _beside(ex: Example, output: Image.Image, index: int) -> bool:
    """New object `index` shows on one of the spots beside the creature: most of its core is
    closer to its colour than to what was there, the core is its colour, and of all shapes drawn
    on that spot it fits the output best (a circle where a star was asked has its colour only)."""
    shape = ex.target_scene.objects[index]
    out = _array(output)
    ink = np.abs(out - np.array(shape.rgb)).sum(axis=2) < np.abs(out - _array(ex.context)).sum(axis=2)
    for x, y in beside_spots(ex.scene):
        core = _core(_shape_alone(ex.scene, replace(shape, cx=x, cy=y)))
        if float(ink[core].mean()) < TOWARD_TARGET or not is_color(output, core, shape.color):
            continue
        drawn = {kind: _shape_alone(ex.scene, replace(shape, kind=kind, cx=x, cy=y)) for kind in SHAPES}
        # Only the ink around this spot: the other new shape may be inked too.
        near = ink & dilate(np.logical_or.reduce(list(drawn.values())), OBJECT_MARGIN)
        fit = {kind: float((near & mask).sum()) / max(1, int((near | mask).sum())) for kind, mask in drawn.items()}
        if max(SHAPES, key=fit.__getitem__) == shape.kind:
            return True
    return False


def _beside_zone(scene: Scene) -> np.ndarray:
    """Boolean (h, w) mask of everywhere a shape put beside the creature may be drawn."""
    zone = np.zeros((scene.height, scene.width), dtype=bool)
    for x, y in beside_spots(scene):
        disc = Shape(kind="circle", color="white", rgb=COLORS["white"], cx=x, cy=y, size=SHAPE_REACH * BESIDE_SIZE)
        zone |= _shape_alone(scene, disc)
    return dilate(zone, 1)


def _grayscale(ex: Example, output: Image.Image) -> bool:
    colored = chroma(ex.context) > CLEAR_DIFF
    return bool(colored.any()) and float(chroma(output)[colored].mean()) < COLORLESS


def _bgref(ex: Example, output: Image.Image) -> bool:
    region = ~dilate(_object_pixels(ex), OBJECT_MARGIN)
    return toward_target(ex, output, region & clearly_changed(ex))


def _emblem(ex: Example, output: Image.Image) -> bool:
    i = ex.info["index"]
    outer, inner = object_mask(ex.target_scene, i), object_mask(ex.target_scene, i + 1)
    ring, middle = _core(outer & ~inner), _core(inner)
    inner_shows = middle.sum() < MIN_TRAIT_PIXELS or is_color(output, middle, ex.info["inner_color"])
    return is_color(output, ring, ex.info["color"]) and inner_shows and toward_target(ex, output, outer & clearly_changed(ex))


def mask_iou(output: Image.Image, mask: np.ndarray) -> float:
    """IoU of the output's light pixels (luminance over mid-grey) and `mask`."""
    light = luminance(output) > 127.5
    union = int((light | mask).sum())
    return float((light & mask).sum()) / union if union else 1.0


def _segment(ex: Example, output: Image.Image) -> bool:
    """The IoU is high, and the output is a mask: white where the object is, black elsewhere
    (a light object on a dark scene, left as it was, has a high IoU too)."""
    mask = exact_mask(ex)
    inside, outside = _core(mask), erode(~mask)
    white = is_color(output, inside, "white") and float(np.median(chroma(output)[inside])) < COLORLESS
    return mask_iou(output, mask) >= SEGMENT_MIN_IOU and white and is_color(output, outside, "black")


CHECKS: dict[str, Callable[[Example, Image.Image], bool]] = {
    "recolor": _recolor,
    "remove": _remove,
    "add": _add,
    "move": _move,
    "background": _background,
    "grayscale": _grayscale,
    "resize": _reshaped,
    "replace": _replace,
    "invert": _restyled,
    "night": _night,
    "texture": _texture,
    "outline": _outline,
    "pixelate": _restyled,
    "pastel": _pastel,
    "text": _text,
    "creature": _creature,
    "bgref": _bgref,
    "emblem": _emblem,
    "segment": _segment,
}


def preserved(example: Example, output: Image.Image) -> bool:
    """Whether the output kept what the edit should not touch. A whole-image family touches every
    pixel, so there the output must stay close to the target instead. A creature kept in place
    is left to its own check, and so are the spots beside it where it was asked to get company."""
    if example.family in WHOLE_IMAGE:
        return psnr(output, example.target) >= PRESERVE_MIN_DB
    outside = ~example.mask
    if example.family == "creature":  # its fine detail is judged trait by trait instead
        outside &= ~dilate(np.logical_or.reduce(list(creature_masks(example.target_scene).values())), 1)
        if "added" in example.info:  # the instruction names no side: any spot beside it may be drawn on
            outside &= ~_beside_zone(example.scene)
    return not outside.any() or psnr(output, example.context, outside) >= PRESERVE_MIN_DB


@dataclass(frozen=True)
class Verdict:
    """One edit judged twice: did the requested change happen, and was the rest kept. The
    report shows both per family, so it says which of the two holds a family back."""

    changed: bool
    kept: bool

    @property
    def success(self) -> bool:
        return self.changed and self.kept


def verdict(example: Example, output: Image.Image) -> Verdict:
    """Both questions for one output; KeyError for a family with no check. An output of the
    wrong size answers neither."""
    check = CHECKS[example.family]
    if output.size != example.target.size:
        return Verdict(changed=False, kept=False)
    return Verdict(changed=check(example, output.convert("RGB")), kept=preserved(example, output))


def success(example: Example, output: Image.Image) -> bool:
    """The requested change happened and the rest is preserved. KeyError for a family with no check."""
    return verdict(example, output).success
