"""The workflow families (issue 20): each example carries what its instruction needs (a second
image where it names one) and an exact mask the benchmark can score against."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from incontext.world.edits import FAMILIES, WORKFLOW_FAMILIES, make_example, select_families
from incontext.world.language import vocabulary
from incontext.world.scene import POSITIONS, free_cells, object_mask, render
from incontext.world.workflows import EMBLEM_SIZE, exact_mask, visible_mask


def _examples(family: str, n: int = 12, seed: str = "") -> list:
    rng = random.Random(f"workflow:{family}{seed}")
    return [make_example(rng, family) for _ in range(n)]


@pytest.mark.parametrize("family", WORKFLOW_FAMILIES)
def test_workflow_examples_are_worded_in_the_vocabulary_and_change_only_inside_their_mask(family):
    vocab = set(vocabulary())
    examples = _examples(family, 30)
    assert all(w in vocab for ex in examples for w in ex.instruction.split())
    assert len({ex.instruction for ex in examples}) >= 8
    for ex in examples:
        ctx, tgt = np.asarray(ex.context, dtype=int), np.asarray(ex.target, dtype=int)
        assert ex.mask.any() and np.abs(ctx - tgt)[~ex.mask].max(initial=0) <= 2
        assert (ex.reference is not None) == (family != "segment")
        if ex.reference is not None:
            assert ex.reference.size == ex.context.size  # the sampler appends it at the output's size


def test_the_removed_objects_exact_mask_is_filled_with_what_was_behind_it():
    for ex in _examples("remove"):
        mask = exact_mask(ex)
        assert mask.any() and not (mask & ~ex.mask).any()  # inside the edit
        behind = np.asarray(render(replace(ex.scene, objects=())), dtype=int)
        # Away from antialiased rims, the target there is the bare background.
        core = mask.copy()
        core[1:] &= mask[:-1]; core[:-1] &= mask[1:]; core[:, 1:] &= mask[:, :-1]; core[:, :-1] &= mask[:, 1:]
        others = np.zeros_like(mask)
        for i in range(len(ex.target_scene.objects)):
            others |= object_mask(ex.target_scene, i)
        core &= ~others
        assert np.abs(np.asarray(ex.target, dtype=int) - behind)[core].max(initial=0) <= 2


def test_bgref_puts_the_contexts_objects_over_the_references_background():
    for ex in _examples("bgref"):
        assert ex.target_scene.objects == ex.scene.objects
        assert ex.target_scene.background != ex.scene.background
        reference_bare = render(replace(ex.target_scene, objects=()))
        background = exact_mask(ex)
        assert np.abs(np.asarray(ex.target, dtype=int) - np.asarray(reference_bare, dtype=int))[background].max() <= 2
        assert "second" in ex.instruction or "other" in ex.instruction


def test_emblem_is_the_references_emblem_small_at_the_place_asked():
    examples = _examples("emblem", 30)
    assert {ex.info["free_spot"] for ex in examples} == {True, False}
    for ex in examples:
        i = ex.info["index"]
        outer, inner = ex.target_scene.objects[i:]
        assert (outer.cx, outer.cy) == POSITIONS[ex.info["position"]] and outer.size == EMBLEM_SIZE
        assert ex.info["position"] in free_cells(ex.scene)
        if ex.info["free_spot"]:
            assert free_cells(ex.scene) == [ex.info["position"]]
            assert "spot" in ex.instruction or "space" in ex.instruction
        else:
            assert "spot" not in ex.instruction
        # The reference shows the same emblem: the same kinds and colours, large.
        assert ex.info["color"] == outer.color and ex.info["inner_color"] == inner.color
        mask = exact_mask(ex)
        assert np.array_equal(mask, object_mask(ex.target_scene, i)) and not (mask & ~ex.mask).any()
        ref = np.asarray(ex.reference, dtype=int)
        h, w = ref.shape[:2]
        assert np.abs(ref[h // 2, w // 2] - np.array(inner.rgb)).max() <= 2  # its inner shape at the centre


def test_segment_target_is_the_objects_visible_pixels_white_on_black():
    for ex in _examples("segment"):
        target = np.asarray(ex.target.convert("L"))
        mask = exact_mask(ex)
        visible = visible_mask(ex.scene, ex.info["index"])
        iou = (mask & visible).sum() / (mask | visible).sum()
        assert iou > 0.95  # equal up to rims shared with an object drawn over it
        assert (target[mask] > 127).all() and (target[~mask] <= 127).all()
        o = ex.scene.objects[ex.info["index"]]
        assert o.kind in ex.instruction or o.color not in ex.instruction.split()[-2:]  # a synonym at most


def test_workflows_are_a_family_set_of_their_own():
    assert select_families("workflows") == ("remove", "bgref", "emblem", "segment")
    assert select_families("bgref,segment") == ("bgref", "segment")
    assert not set(WORKFLOW_FAMILIES) & set(FAMILIES)  # "all" still means what past scores measured
    with pytest.raises(ValueError, match="workflows"):
        select_families("teleport")
