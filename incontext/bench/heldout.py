"""The fixed held-out set: world examples per family, and multi-turn edit sequences.

Everything is drawn from streams seeded by `HELD_OUT_SEED` (training only ever uses the chunk
seeds), one stream per family, so the examples of a family stay the same when `n` grows or
when the world gains a family. Families are read from the world at call time: a family added
to `edits.FAMILIES` joins the benchmark without a change here. `basic_families()` is the
issue-2 set, for scores that must stay comparable with what was measured before the world grew.
"""

from __future__ import annotations

import random

from incontext.bench import checks
from incontext.train.data import HELD_OUT_SEED
from incontext.world import edits
from incontext.world.edits import Example, apply_edit, build_example, make_example, random_scene

# Every other example square, the rest taking turns over the non-square training sizes:
# (128, 128), (160, 96), (128, 128), (96, 160), …
_NON_SQUARE = [(w, h) for w, h in edits.TRAIN_SIZES if w != h]
HELD_OUT_SIZES = tuple(size for other in _NON_SQUARE for size in ((128, 128), other))
# Edits that change (nearly) every pixel leave nothing for a preservation score to measure,
# so multi-turn sequences are made of the others.
GLOBAL_FAMILIES = ("background", "grayscale")
MIN_VISIBLE_PIXELS = 12  # an edit changing fewer pixels than this clearly is not checkable


def families() -> tuple[str, ...]:
    return tuple(edits.FAMILIES)


def basic_families() -> tuple[str, ...]:
    return tuple(edits.BASIC_FAMILIES)


def drift_families() -> tuple[str, ...]:
    # From the basic set only: a sequence draws its families from one stream, so any new
    # family would change every sequence after its first use, and the drift score with it.
    return tuple(f for f in edits.BASIC_FAMILIES if f not in GLOBAL_FAMILIES)


def visible(example: Example) -> bool:
    """Whether the edit clearly changes at least a few pixels (an all-gray scene made grayscale does not)."""
    return int(checks.clearly_changed(example).sum()) >= MIN_VISIBLE_PIXELS


def heldout_examples(family: str, n: int, seed: int = HELD_OUT_SEED) -> list[Example]:
    """The first `n` held-out examples of `family`: the same on every machine and every run."""
    rng = random.Random(f"{seed}:{family}")
    out: list[Example] = []
    while len(out) < n:
        ex = make_example(rng, family, size=HELD_OUT_SIZES[len(out) % len(HELD_OUT_SIZES)])
        if visible(ex):
            out.append(ex)
    return out


def heldout_set(n_per_family: int, seed: int = HELD_OUT_SEED, only: tuple[str, ...] | None = None) -> dict[str, list[Example]]:
    """The held-out examples of every family, or of the families in `only`."""
    return {family: heldout_examples(family, n_per_family, seed) for family in (only or families())}


def _edit_example(scene, family: str, rng: random.Random) -> Example | None:
    made = apply_edit(scene, family, rng)
    if made is None:
        return None
    ex = build_example(family, scene, made)
    return ex if visible(ex) else None


def heldout_sequence(rng: random.Random, turns: int, size: tuple[int, int]) -> list[Example]:
    """`turns` successive edits of one scene: each edit's context is the previous edit's target."""
    while True:
        scene, sequence = random_scene(rng, size=size), []
        for _ in range(50):  # a scene can run out of possible edits (no objects, no free cells)
            ex = _edit_example(scene, rng.choice(drift_families()), rng)
            if ex is not None:
                sequence.append(ex)
                scene = ex.target_scene
                if len(sequence) == turns:
                    return sequence


def heldout_sequences(k: int, turns: int, seed: int = HELD_OUT_SEED) -> list[list[Example]]:
    """`k` multi-turn sequences for the drift score, from their own held-out stream."""
    rng = random.Random(f"{seed}:multi-turn")
    return [heldout_sequence(rng, turns, HELD_OUT_SIZES[i % len(HELD_OUT_SIZES)]) for i in range(k)]
