"""The workflow scores (issue 20) of one benchmark row, from each example's exact mask.

- remove: the removed object's pixels filled with what was behind it (PSNR to the target there);
- bgref: the background taken from the second image (PSNR to the target on the background);
- emblem: the emblem at the place asked (PSNR to the target in the emblem's box, grown 2 px);
- segment: IoU of the output split at mid-grey against the object's exact mask (the model
  asked for a mask in the held-out words), and of the segmentation workflow's own mask as a
  user gets it (`workflow_example`: it removes the object named by its colour and kind, and
  the mask is what that changed, workflows.removed_mask);

and for the first three, the subject kept: PSNR to the input outside the change (the edit
mask), with the share of examples at or over the 40 dB goal. Success is the checks' own
(`checks.CHECKS`). PSNRs over several images are the dB of their mean squared error.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from incontext import workflows
from incontext.bench import checks
from incontext.world.edits import Example, build_example
from incontext.world.workflows import BENCH_FAMILIES, exact_mask

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


def workflow_example(ex: Example) -> Example:
    """The edit the segmentation workflow makes of a held-out segment example, called as a
    user calls it (prompt: the object's colour and kind): the object's removal, with the exact
    removal as its target."""
    i = ex.info["index"]
    thing = ex.scene.objects[i]
    plan = workflows.plan_segmentation(workflows.SegmentationInput(image_url="-", prompt=f"the {thing.color} {thing.kind}"))
    return build_example("remove", ex.scene, (ex.scene.without(i), plan.prompt, {"index": i}))


def family_scores(examples: list[Example], outputs: list[Image.Image], verdicts: list,
                  workflow_outputs: list[Image.Image] | None = None) -> dict:
    """One workflow family's figures for one row; `workflow_outputs`, a segment family's
    outputs of `workflow_example`, gives the segmentation workflow's own figures."""
    family = examples[0].family
    scored = [v for v in verdicts if v is not None]
    out = {"n": len(examples), "success": sum(v.success for v in scored) / len(scored) if scored else None}
    if family == "segment":
        out["iou"] = float(np.mean([checks.mask_iou(o, exact_mask(ex)) for ex, o in zip(examples, outputs)]))
        if workflow_outputs is not None:  # what the segmentation workflow returns
            ious = [checks.mask_iou(workflows.removed_mask(o, ex.context), exact_mask(ex)) for ex, o in zip(examples, workflow_outputs)]
            out["workflow_iou"] = float(np.mean(ious))
            out["workflow_at_goal"] = float(np.mean([v >= SEGMENT_GOAL_IOU for v in ious]))
        return out
    out[FIGURES[family]] = _db_of_mean([checks.mse(o, ex.target, _region(ex)) for ex, o in zip(examples, outputs)])
    kept = [checks.mse(o, ex.context, ~ex.mask) for ex, o in zip(examples, outputs)]
    out["kept_psnr"] = _db_of_mean(kept)
    out["kept_at_goal"] = float(np.mean([checks.db(e) >= KEPT_GOAL_DB for e in kept]))
    return out


def workflow_scores(heldout_set: dict[str, list[Example]], images: dict[str, list[Image.Image]], verdicts: dict[str, list],
                    segmentation_outputs: list[Image.Image] | None = None) -> dict:
    """{family: figures} for the workflow families in the held-out set (removal among them)."""
    return {f: family_scores(heldout_set[f], images[f], verdicts[f], segmentation_outputs if f == "segment" else None)
            for f in BENCH_FAMILIES if heldout_set.get(f)}
