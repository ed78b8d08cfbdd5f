"""Edit examples with exact ground truth: (context image, instruction, target image, edit mask).

`make_example(rng, family)` draws a random scene, applies one edit of the family to the scene
data and renders both. `BASIC_FAMILIES` are the issue-2 set (recolor, remove, add, move,
background, grayscale); `KONTEXT_FAMILIES` extend the world towards KontextBench's task
families; `FAMILIES` is all of them. Local edits live here; whole-image looks and textures in
`restyle`, written words in `text`, the creature (character reference) in `character`.
`WORKFLOW_FAMILIES` (`workflows`: a background from a second image, an emblem to place, an
object to mask) are not in `FAMILIES`, so "all" keeps meaning what past scores measured;
`select_families("workflows")` names them with removal.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from incontext.world.language import POSITION_WORDS, phrase, say_object
from incontext.world import character, restyle, text, workflows
from incontext.world.scene import COLORS, POSITIONS, ROTATED_SHAPES, SHAPES, Background, Scene, Shape, distinct, free_cells, jitter, render

BASIC_FAMILIES = ("recolor", "remove", "add", "move", "background", "grayscale")
# Appended, never interleaved: a family's examples come from its own rng draws, so the basic
# families draw exactly what they drew before these existed.
KONTEXT_FAMILIES = ("resize", "replace", *restyle.FAMILIES, "text", "creature")
FAMILIES = BASIC_FAMILIES + KONTEXT_FAMILIES
WORKFLOW_FAMILIES = workflows.FAMILIES
# Sizes the nano model is trained on (width, height): square and two non-square.
TRAIN_SIZES = ((128, 128), (160, 96), (96, 160))
ADD_SIZE = 0.13  # radius of an added shape, fraction of the shorter side
CELL_JITTER = 0.07
# Resize factors: far enough from 1 that the changed ring is several pixels wide.
BIGGER = (1.4, 1.7)
SMALLER = (0.5, 0.65)


@dataclass
class Example:
    family: str
    instruction: str
    context: Image.Image
    target: Image.Image
    mask: np.ndarray  # bool (h, w): where the edit is allowed to change pixels
    scene: Scene
    target_scene: Scene
    info: dict
    # A second image the instruction draws on ("the background of the second image"), at the
    # context's size; None for single-image edits.
    reference: Image.Image | None = None


def random_background(rng: random.Random, exclude: set[str] = frozenset()) -> Background:
    name = rng.choice([c for c in COLORS if c not in exclude])
    rgb = jitter(COLORS[name], rng, 10)
    if rng.random() < 0.3:  # a gentle gradient: removal must reveal it, not a flat colour
        return Background(rgb=rgb, rgb2=jitter(rgb, rng, 30), color=name)
    return Background(rgb=rgb, color=name)


def random_scene(rng: random.Random, size: tuple[int, int] | None = None, n_objects: int | None = None) -> Scene:
    w, h = size or rng.choice(TRAIN_SIZES)
    bg = random_background(rng)
    n = n_objects if n_objects is not None else rng.choice((1, 2, 2, 3, 3, 4))
    cells = rng.sample(list(POSITIONS), n)
    used: set[tuple[str, str]] = set()
    objs = []
    for cell in cells:
        for _ in range(20):
            color = rng.choice([c for c in COLORS if c != bg.color])
            kind = rng.choice(SHAPES)
            rgb = jitter(COLORS[color], rng)
            if (color, kind) not in used and distinct(rgb, bg.rgb):
                break
        used.add((color, kind))
        fx, fy = POSITIONS[cell]
        objs.append(
            Shape(
                kind=kind,
                color=color,
                rgb=rgb,
                cx=fx + rng.uniform(-CELL_JITTER, CELL_JITTER),
                cy=fy + rng.uniform(-CELL_JITTER, CELL_JITTER),
                size=rng.uniform(0.09, 0.15),
                angle=rng.uniform(-12, 12) if kind in ROTATED_SHAPES else 0.0,
            )
        )
    return Scene(width=w, height=h, background=bg, objects=tuple(objs))


def _unique_ref(scene: Scene, i: int) -> bool:
    o = scene.objects[i]
    return sum(1 for p in scene.objects if (p.color, p.kind) == (o.color, o.kind)) == 1


# Families whose instruction names one object by its colour and kind (segment's edit is
# world/workflows.py's; the others are apply_edit's).
ONE_OBJECT = ("recolor", "remove", "move", "resize", "replace")
REFERRING = ONE_OBJECT + ("segment",)


def apply_edit(scene: Scene, family: str, rng: random.Random) -> tuple[Scene, str, dict] | None:
    """The edited scene, the instruction and facts about the edit; None if the scene doesn't allow it."""
    objs = scene.objects
    if family in ONE_OBJECT:
        if not objs:
            return None
        i = rng.randrange(len(objs))
        if not _unique_ref(scene, i):
            return None
        o = objs[i]
        ref = say_object(o.color, o.kind, rng)
        if family == "recolor":
            taken = {(p.color, p.kind) for p in objs}
            options = [c for c in COLORS if c != o.color and c != scene.background.color and (c, o.kind) not in taken]
            options = [c for c in options if distinct(COLORS[c], scene.background.rgb)]
            if not options:
                return None
            new = rng.choice(options)
            edited = scene.with_object(i, replace(o, color=new, rgb=COLORS[new]))
            return edited, phrase("recolor", rng, obj=ref, color=new), {"index": i, "color": new}
        if family == "remove":
            return scene.without(i), phrase("remove", rng, obj=ref), {"index": i}
        if family == "resize":
            return _resize(scene, i, ref, rng)
        if family == "replace":
            return _replace(scene, i, ref, rng)
        free = free_cells(scene)
        if not free:
            return None
        cell = rng.choice(free)
        fx, fy = POSITIONS[cell]
        edited = scene.with_object(i, replace(o, cx=fx, cy=fy))
        pos = rng.choice(POSITION_WORDS[cell])
        return edited, phrase("move", rng, obj=ref, pos=pos), {"index": i, "position": cell}
    if family == "add":
        free = free_cells(scene)
        if not free or len(objs) >= 5:
            return None
        cell = rng.choice(free)
        taken = {(p.color, p.kind) for p in objs}
        color = rng.choice([c for c in COLORS if c != scene.background.color and distinct(COLORS[c], scene.background.rgb)])
        kind = rng.choice(SHAPES)
        if (color, kind) in taken:
            return None
        fx, fy = POSITIONS[cell]
        new = Shape(kind=kind, color=color, rgb=COLORS[color], cx=fx, cy=fy, size=ADD_SIZE)
        edited = replace(scene, objects=objs + (new,))
        pos = rng.choice(POSITION_WORDS[cell])
        return edited, phrase("add", rng, obj=f"{color} {kind}", pos=pos), {"index": len(objs), "position": cell, "color": color}
    if family == "background":
        options = [c for c in COLORS if c != scene.background.color and all(distinct(COLORS[c], o.rgb) for o in objs)]
        if not options:
            return None
        color = rng.choice(options)
        edited = replace(scene, background=Background(rgb=COLORS[color], color=color))
        return edited, phrase("background", rng, color=color), {"color": color}
    if family == "grayscale":
        if scene.grayscale:
            return None
        return replace(scene, grayscale=True), phrase("grayscale", rng), {}
    if family in restyle.FAMILIES:
        return restyle.apply_edit(scene, family, rng)
    if family == "text":
        return text.apply_edit(scene, rng)
    if family == "creature":
        return character.apply_edit(scene, rng)
    if family in WORKFLOW_FAMILIES:
        return workflows.apply_edit(scene, family, rng)
    raise ValueError(f"unknown edit family {family!r}")


def _resize(scene: Scene, i: int, ref: str, rng: random.Random) -> tuple[Scene, str, dict]:
    o = scene.objects[i]
    bigger = rng.random() < 0.5
    factor = rng.uniform(*(BIGGER if bigger else SMALLER))
    word = rng.choice(("bigger", "larger")) if bigger else "smaller"
    edited = scene.with_object(i, replace(o, size=o.size * factor))
    return edited, phrase("resize", rng, obj=ref, size=word), {"index": i, "bigger": bigger, "factor": factor}


def _replace(scene: Scene, i: int, ref: str, rng: random.Random) -> tuple[Scene, str, dict] | None:
    """The object becomes another kind of shape in the same place; sometimes in another colour too."""
    o = scene.objects[i]
    kind = rng.choice([k for k in SHAPES if k != o.kind])
    color, rgb = o.color, o.rgb
    if rng.random() < 0.3:
        options = [c for c in COLORS if c not in (o.color, scene.background.color) and distinct(COLORS[c], scene.background.rgb)]
        color = rng.choice(options)
        rgb = COLORS[color]
    if any((p.color, p.kind) == (color, kind) for p in scene.objects):
        return None
    angle = o.angle if kind in ROTATED_SHAPES else 0.0
    edited = scene.with_object(i, replace(o, kind=kind, color=color, rgb=rgb, angle=angle))
    new = kind if color == o.color else f"{color} {kind}"
    return edited, phrase("replace", rng, obj=ref, new=new), {"index": i, "kind": kind, "color": color}


def edit_mask(context: Image.Image, target: Image.Image) -> np.ndarray:
    diff = np.abs(np.asarray(context, dtype=np.int16) - np.asarray(target, dtype=np.int16)).max(axis=2) > 2
    # Grow by one pixel so antialiased rims count as part of the edit.
    grown = diff.copy()
    grown[1:] |= diff[:-1]
    grown[:-1] |= diff[1:]
    grown[:, 1:] |= diff[:, :-1]
    grown[:, :-1] |= diff[:, 1:]
    return grown


# Families whose edit needs something a plain random scene does not have, and what adds it.
_DRESS = {"text": text.with_word, "creature": character.with_creature, "emblem": workflows.with_free_spot}


def select_families(spec: str) -> tuple[str, ...]:
    """"all", "basic" (BASIC_FAMILIES), "workflows" (removal and WORKFLOW_FAMILIES) or a
    comma-separated list of names; ValueError if unknown."""
    if spec == "all":
        return FAMILIES
    if spec == "basic":
        return BASIC_FAMILIES
    if spec == "workflows":
        return workflows.BENCH_FAMILIES
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    known = FAMILIES + WORKFLOW_FAMILIES
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown edit families {unknown or spec!r}; known: all, basic, workflows, {', '.join(known)}")
    return names


def confusable(scene: Scene, rng: random.Random) -> Scene:
    """`scene` with two of its objects made alike in one word: the same colour (another kind)
    or the same kind (another colour), so an instruction that names either needs both words.
    Training data drawn this way teaches the model the kind as well as the colour (left alone,
    it takes "the yellow heart" for any yellow thing)."""
    if len(scene.objects) < 2:
        return scene
    a, b = rng.sample(range(len(scene.objects)), 2)
    first, second = scene.objects[a], scene.objects[b]
    taken = {(p.color, p.kind) for k, p in enumerate(scene.objects) if k != b}
    if rng.random() < 0.5:  # same colour, another kind
        options = [(first.color, k) for k in SHAPES if (first.color, k) not in taken]
    else:  # same kind, another colour
        options = [(c, first.kind) for c in COLORS
                   if c != scene.background.color and (c, first.kind) not in taken and distinct(COLORS[c], scene.background.rgb)]
    if not options:
        return scene
    color, kind = rng.choice(options)
    rgb = second.rgb if color == second.color else jitter(COLORS[color], rng)
    angle = second.angle if kind in ROTATED_SHAPES else 0.0
    return scene.with_object(b, replace(second, color=color, kind=kind, rgb=rgb, angle=angle))


def make_example(rng: random.Random, family: str | None = None, size: tuple[int, int] | None = None,
                 families: tuple[str, ...] = FAMILIES, confusable_share: float = 0.0) -> Example:
    """A random example of `family` (if None, of a family drawn from `families`); with
    `confusable_share`, that share of the REFERRING families' scenes has two objects alike in
    colour or kind (`confusable`)."""
    while True:
        fam = family or rng.choice(families)
        scene = random_scene(rng, size=size)
        if fam in _DRESS:
            scene = _DRESS[fam](scene, rng)
        if confusable_share and fam in REFERRING and rng.random() < confusable_share:
            scene = confusable(scene, rng)
        made = apply_edit(scene, fam, rng)
        if made is not None:
            return build_example(fam, scene, made)


def build_example(family: str, scene: Scene, made: tuple[Scene, str, dict]) -> Example:
    """The rendered example of an edit `apply_edit` made of `scene`."""
    target_scene, instruction, info = made
    info = dict(info)
    reference_scene = info.pop("reference_scene", None)
    context, target = render(scene), render(target_scene)
    reference = render(reference_scene) if reference_scene is not None else None
    return Example(family, instruction, context, target, edit_mask(context, target), scene, target_scene, info, reference)
