"""`train selector`: the segment-picking head trained for a model directory's text encoders."""

from __future__ import annotations

import shutil

import numpy as np

from incontext import selector
from incontext.models.loader import load_model
from incontext.train.selector import build, train_selector
from incontext.world.scene import COLORS, Background, Scene, Shape, render


def test_trains_a_selector_into_the_model_directory_that_the_loader_then_uses(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    result = train_selector(model, n=40, check=10, minutes=0.01, batch=16)
    assert result["steps"] >= 1 and 0.0 <= result["picked_right"] <= 1.0
    m = load_model(model, dtype="float32")
    assert m.selector is not None
    scene = Scene(width=64, height=64, background=Background(rgb=COLORS["gray"], color="gray"),
                  objects=(Shape(kind="circle", color="red", rgb=COLORS["red"], cx=0.5, cy=0.5, size=0.2),))
    drawn = selector.draw(m, "make a mask of the red circle", render(scene))
    assert drawn is not None and drawn.size == (64, 64)
    assert set(np.unique(np.asarray(drawn.convert("L"))).tolist()) <= {0, 255}


def test_each_training_example_labels_the_named_thing_s_segments(tiny_model):
    data = build(load_model(tiny_model, dtype="float32"), 30, seed=5)
    assert data.features.shape[1:] == (selector.MAX_SEGMENTS, selector.FEATURES)
    positives = data.labels.sum(dim=1)
    # One thing is named in each scene: its inside is one segment, or a few where other things split it.
    assert (positives >= 1).float().mean() > 0.9 and (positives <= 3).all()
    assert not data.labels[~data.valid].any()
