"""`train selector`: the segment-picking head (incontext/selector.py) on the world's mask edits.

Each example is a world scene with one object named as the `segment` family names it (the
workflows' "make a mask of the …" among its phrasings), with two objects alike in colour or
kind in `CONFUSABLE` of them, so the phrase needs both words, and wider shades of the
world's colours in `SHADED` of them. A segment is the thing where
at least half its pixels are in the named object's exact visible mask. The model's text
encoders are frozen: the head learns to read their states.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from incontext import sampler, selector
from incontext.world.edits import make_example
from incontext.world.scene import COLORS, Scene, distinct, jitter, render
from incontext.world.workflows import visible_mask

log = logging.getLogger(__name__)

CONFUSABLE = 0.6
SHADED = 0.5  # share of scenes whose things take wider shades of their colours (`shaded`)
SHADE = 60
TRAIN_SEED = 30_000_000  # example i of the training set is drawn from Random(TRAIN_SEED + i)
CHECK_SEED = 40_000_000  # the held-out check's examples; the benchmark's are another seed still


@dataclass
class Set:
    txt: torch.Tensor  # (N, L, D)
    vec: torch.Tensor  # (N, P)
    features: torch.Tensor  # (N, S, F), zero rows past each example's segments
    valid: torch.Tensor  # (N, S) bool
    labels: torch.Tensor  # (N, S) float: 1 where the segment is the named thing's


def _nearest_name(rgb: tuple[int, int, int]) -> str:
    return min(COLORS, key=lambda name: sum(abs(a - b) for a, b in zip(COLORS[name], rgb)))


def shaded(scene: Scene, rng: random.Random) -> Scene:
    """`scene` with its things in wider shades of their colours than the world draws (up to
    SHADE levels a channel off), each still nearest its own colour's name and apart from the
    background: a user's "orange" is rarely the world's."""
    things = []
    for thing in scene.objects:
        for _ in range(10):
            rgb = jitter(COLORS[thing.color], rng, SHADE)
            if _nearest_name(rgb) == thing.color and distinct(rgb, scene.background.rgb):
                thing = replace(thing, rgb=rgb)
                break
        things.append(thing)
    return replace(scene, objects=tuple(things))


def build(models: sampler.Models, n: int, seed: int) -> Set:
    rows, prompts = [], []
    for i in range(n):
        rng = random.Random(seed + i)
        ex = make_example(rng, family="segment", confusable_share=CONFUSABLE)
        context, exact = ex.context, np.asarray(ex.target.convert("L")) > 127
        if rng.random() < SHADED:
            scene = shaded(ex.scene, rng)
            context, exact = render(scene), visible_mask(scene, ex.info["index"])
        found = selector.candidates(context)
        if found is None:
            continue
        share = np.array([exact[found.labels == sid].mean() for sid in found.ids.tolist()])
        rows.append((found.features, share >= 0.5))
        prompts.append(ex.instruction)
    s = selector.MAX_SEGMENTS
    features = torch.zeros(len(rows), s, selector.FEATURES)
    valid = torch.zeros(len(rows), s, dtype=torch.bool)
    labels = torch.zeros(len(rows), s)
    for k, (f, y) in enumerate(rows):
        features[k, : len(f)] = torch.from_numpy(f)
        valid[k, : len(f)] = True
        labels[k, : len(y)] = torch.from_numpy(y.astype(np.float32))
    txt, vec = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), 256):
            t, v = sampler.encode_text(models, prompts[start : start + 256])
            txt.append(t.float())
            vec.append(v.float())
    return Set(torch.cat(txt), torch.cat(vec), features, valid, labels)


def picked_right(head: selector.Selector, data: Set) -> float:
    """The share of examples whose every segment the head scores as labelled: the thing's
    segments over even odds, the rest under. (Its segments lack the thing's antialiased rim,
    so their IoU with the exact mask is not the figure: what a workflow needs is the pick.)"""
    with torch.no_grad():
        picked = head(data.txt, data.vec, data.features).sigmoid() >= selector.THRESHOLD
    return float(((picked == (data.labels > 0.5)) | ~data.valid).all(dim=1).float().mean())


def train_selector(model_dir: Path, *, n: int = 12_000, check: int = 1_000, minutes: float = 5.0, lr: float = 2e-3,
                   batch: int = 256, seed: int = 0) -> dict:
    """Train the head for `model_dir`'s text encoders and write it into `model_dir/selector`."""
    from incontext.models.loader import load_model

    torch.manual_seed(seed)
    models = load_model(model_dir, dtype="float32")
    started = time.perf_counter()
    train, held = build(models, n, TRAIN_SEED), build(models, check, CHECK_SEED)
    log.info("built %d + %d examples in %.0f s", len(train.labels), len(held.labels), time.perf_counter() - started)
    head = selector.Selector(selector.SelectorConfig(text_dim=train.txt.shape[-1], pooled_dim=train.vec.shape[-1]))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    deadline, step = time.perf_counter() + minutes * 60, 0
    while time.perf_counter() < deadline:
        order = torch.randperm(len(train.labels))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            logits = head(train.txt[idx], train.vec[idx], train.features[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[train.valid[idx]], train.labels[idx][train.valid[idx]])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        log.info("step %d loss %.4f", step, loss.item())
    head.eval()
    selector.save(head, model_dir)
    return {"steps": step, "loss": float(loss.item()), "picked_right": picked_right(head, held), "examples": len(train.labels)}
