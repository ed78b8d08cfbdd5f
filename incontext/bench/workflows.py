"""The workflow scores (issue 20) of one benchmark row, from each example's exact mask.

- remove: the removed object's pixels filled with what was behind it (PSNR to the target there);
- bgref: the background taken from the second image (PSNR to the target on the background);
- emblem: the emblem at the place asked (PSNR to the target in the emblem's box, grown 2 px);
  and the logo-placement workflow's output as a user with a box around that place gets it
  (`logo_output`: the model's edit inside the box, the logo's own pixels laid in it); and
  for bgref, the background-replace workflow's output (`backdrop_output`: the edit kept on the
  input's backdrop only);
- segment: IoU of the output split at mid-grey against the object's exact mask (the model
  asked for a mask in the held-out words), and of the segmentation workflow's own mask as a
  user gets it (`workflow_output`: it removes the object named by its colour and kind and asks
  for a mask of it beside that; the model's selector picks it among the input's segments, or
  the model draws it, which then picks among the removed regions, workflows.finish); remove: the object-removal workflow's output the same way;

and for the first three, the subject kept: PSNR to the input outside the change (the edit
mask), with the share of examples at or over the 40 dB goal. Success is the checks' own
(`checks.CHECKS`). PSNRs over several images are the dB of their mean squared error.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from incontext import workflows
from incontext.bench import checks
from incontext.world.edits import Example, build_example
from incontext.world.scene import object_mask
from incontext.world.workflows import BENCH_FAMILIES, EMBLEM_INNER, REFERENCE_EMBLEM_SIZE, exact_mask, segment_target

KEPT_GOAL_DB = 40.0
SEGMENT_GOAL_IOU = 0.9  # issue 20's goal for a segmentation mask (checks.SEGMENT_MIN_IOU is the edit's pass mark)
BOX_MARGIN = 2  # pixels around the emblem: a model that draws it a little off still lands in its box

# What each family's own figure is called, and what it measures.
FIGURES = {"remove": "fill_psnr", "bgref": "background_psnr", "emblem": "box_psnr", "segment": "iou"}


def box(mask: np.ndarray, margin: int = BOX_MARGIN) -> np.ndarray:
    """The mask's bounding box grown by `margin` pixels, as a boolean mask."""
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[max(0, ys.min() - margin) : ys.max() + margin + 1, max(0, xs.min() - margin) : xs.max() + margin + 1] = True
    return out


def _region(ex: Example) -> np.ndarray:
    mask = exact_mask(ex)
    return box(mask) if ex.family == "emblem" else mask


def _db_of_mean(errors: list[float]) -> float:
    errors = [e for e in errors if not math.isnan(e)]
    return checks.db(float(np.mean(errors))) if errors else math.nan


# The families whose workflow runs edits of its own, as a user calls it: the removal in the
# workflow's words, and beside it its mask request for the thing (workflows.Plan.select).
RUN_BY_WORKFLOW = {"segment": "segmentation", "remove": "object-removal"}


def _plan(ex: Example) -> workflows.Plan:
    thing = ex.scene.objects[ex.info["index"]]
    flow = workflows.WORKFLOWS[RUN_BY_WORKFLOW[ex.family]]
    return flow.plan(flow.input(image_url="-", prompt=f"the {thing.color} {thing.kind}"))


def workflow_example(ex: Example) -> Example:
    """The removal the segmentation or object-removal workflow makes of a held-out segment or
    remove example, called as a user calls it (prompt: the object's colour and kind), with the
    exact removal as its target."""
    i = ex.info["index"]
    return build_example("remove", ex.scene, (ex.scene.without(i), _plan(ex).prompt, {"index": i}))


def select_example(ex: Example) -> Example:
    """The workflow's second edit of the same example: the model asked for a mask of the thing
    (its target the thing white on black)."""
    i = ex.info["index"]
    return build_example("segment", ex.scene, (segment_target(ex.scene, i), _plan(ex).select, {"index": i}))


def workflow_output(ex: Example, removal: Image.Image, drawn: workflows.Drawn) -> workflows.Finished:
    """What the workflow returns for a held-out segment or remove example from its two edits."""
    return workflows.finish(RUN_BY_WORKFLOW[ex.family], removal, None, source_size=ex.context.size, source=ex.context, drawn=drawn)


def logo_file(ex: Example) -> Image.Image:
    """The logo a user would upload for a held-out emblem example: the second image's emblem
    cut out of its paper (RGBA: transparent where the paper shows, an antialiased rim as much
    as it is the outer shape's colour), cropped to it."""
    i, rgb = ex.info["index"], np.asarray(ex.reference.convert("RGB"), np.float32)
    paper, outer = rgb[0, 0], np.array(ex.target_scene.objects[i].rgb, np.float32)  # the emblem is drawn in the middle
    # The outer shape's rim is a blend of it and the paper only: its share is the projection.
    alpha = np.clip((rgb - paper) @ (outer - paper) / float((outer - paper) @ (outer - paper)), 0, 1)
    # The inner shape, as the second image draws it (world/workflows.py), is wholly the emblem.
    inner = replace(ex.target_scene.objects[i + 1], cx=0.5, cy=0.5, size=REFERENCE_EMBLEM_SIZE * EMBLEM_INNER)
    inside = object_mask(replace(ex.target_scene, objects=(inner,)), 0)
    alpha[np.asarray(Image.fromarray(inside).filter(ImageFilter.MaxFilter(3)))] = 1.0
    ys, xs = np.nonzero(alpha * 255 >= 0.5)
    rgba = np.dstack([rgb, alpha * 255])[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return Image.fromarray(np.rint(rgba).astype(np.uint8), mode="RGBA")


def logo_output(ex: Example, output: Image.Image) -> Image.Image:
    """The logo-placement workflow's output for a held-out emblem example, as a user gets it who
    marks the place asked with a box (the bounding box of what the exact edit changes): the
    model's edit kept inside the box only (the workflow's mask), the logo's own pixels laid in it."""
    changed = np.any(np.asarray(ex.target) != np.asarray(ex.context), axis=-1)
    ys, xs = np.nonzero(changed)
    where = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    allowed = workflows.box_mask(ex.context.size, where)
    return workflows.place_logo(Image.composite(output, ex.context, allowed), logo_file(ex), where, allowed)[0]


def backdrop_output(ex: Example, output: Image.Image) -> Image.Image:
    """The background-replace workflow's output for a held-out bgref example: the model's edit
    (preserved) kept only on the input's backdrop (workflows.backdrop_mask), as the workflow's
    mask keeps it; an input with no backdrop keeps the edit whole."""
    backdrop = workflows.backdrop_mask(ex.context)
    return output if backdrop is None else Image.composite(output, ex.context, backdrop)


# Per family, its workflow's output from the model's edit, where the workflow does more than the edit.
WORKFLOW_OUTPUTS = {"bgref": backdrop_output, "emblem": logo_output}
# Per workflow family, the workflow (incontext/workflows.py) that serves it.
WORKFLOW_OF = {**RUN_BY_WORKFLOW, "bgref": "background-replace", "emblem": "logo-placement"}


def family_scores(examples: list[Example], outputs: list[Image.Image], verdicts: list,
                  workflow_runs: list[workflows.Finished] | None = None, workflows_too: bool = False,
                  workflow_edits: list[Image.Image] | None = None) -> dict:
    """One workflow family's figures for one row; `workflow_runs`, a segment or remove
    family's `workflow_output`s, gives the segmentation or object-removal workflow's own
    figures; `workflows_too`, bgref's and emblem's the background-replace and logo-placement
    workflows' (WORKFLOW_OUTPUTS), from `workflow_edits` where the workflow makes its own edits
    (else from the family's `outputs`)."""
    family = examples[0].family
    scored = [v for v in verdicts if v is not None]
    out = {"n": len(examples), "success": sum(v.success for v in scored) / len(scored) if scored else None}
    if family == "segment":
        out["iou"] = float(np.mean([checks.mask_iou(o, exact_mask(ex)) for ex, o in zip(examples, outputs)]))
        if workflow_runs is not None:  # what the segmentation workflow returns
            ious = [checks.mask_iou(done.mask, exact_mask(ex)) for ex, done in zip(examples, workflow_runs)]
            out["workflow_iou"] = float(np.mean(ious))
            out["workflow_at_goal"] = float(np.mean([v >= SEGMENT_GOAL_IOU for v in ious]))
        return out
    out[FIGURES[family]] = _db_of_mean([checks.mse(o, ex.target, _region(ex)) for ex, o in zip(examples, outputs)])
    kept = [checks.mse(o, ex.context, ~ex.mask) for ex, o in zip(examples, outputs)]
    out["kept_psnr"] = _db_of_mean(kept)
    out["kept_at_goal"] = float(np.mean([checks.db(e) >= KEPT_GOAL_DB for e in kept]))
    made = None
    if workflow_runs is not None:  # what the object-removal workflow returns
        made = [done.image for done in workflow_runs]
    elif workflows_too and family in WORKFLOW_OUTPUTS:  # what the family's workflow returns
        made = [WORKFLOW_OUTPUTS[family](ex, o) for ex, o in zip(examples, workflow_edits or outputs)]
    if made is not None:
        out["workflow_success"] = float(np.mean([checks.verdict(ex, m).success for ex, m in zip(examples, made)]))
        out["workflow_value"] = _db_of_mean([checks.mse(m, ex.target, _region(ex)) for ex, m in zip(examples, made)])
        kept = [checks.mse(m, ex.context, ~ex.mask) for ex, m in zip(examples, made)]
        out["workflow_kept_psnr"] = _db_of_mean(kept)
        out["workflow_kept_at_goal"] = float(np.mean([checks.db(e) >= KEPT_GOAL_DB for e in kept]))
    return out


def workflow_scores(heldout_set: dict[str, list[Example]], images: dict[str, list[Image.Image]], verdicts: dict[str, list],
                    workflow_runs: dict[str, list[workflows.Finished]] | None = None, workflows_too: bool = False,
                    workflow_edits: dict[str, list[Image.Image]] | None = None) -> dict:
    """{family: figures} for the workflow families in the held-out set (removal among them);
    `workflow_runs`: per family in RUN_BY_WORKFLOW, its workflow's outputs (`workflow_output`);
    `workflow_edits`: per family in WORKFLOW_OUTPUTS, its workflow's own edits where they are not the family's."""
    return {f: family_scores(heldout_set[f], images[f], verdicts[f], (workflow_runs or {}).get(f), workflows_too,
                             (workflow_edits or {}).get(f))
            for f in BENCH_FAMILIES if heldout_set.get(f)}
