"""incontext/selector.py: the bundled model's head that picks the segments a phrase names
(segmentation's and object removal's mask), its segments, and its files."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from incontext import selector
from incontext.models.registry import BUNDLED_NANO_DIR
from incontext.world.scene import COLORS, Background, Scene, Shape, render
from incontext.world.workflows import visible_mask


@pytest.fixture(scope="module")
def nano():
    from incontext.models.loader import load_model

    return load_model(BUNDLED_NANO_DIR, dtype="float32")


def _scene(*things: tuple[str, str, float, float]) -> Scene:
    """Things (colour, kind, centre x, centre y) on a plain beige-ish background."""
    shapes = tuple(Shape(kind=kind, color=color, rgb=COLORS[color], cx=cx, cy=cy, size=0.13) for color, kind, cx, cy in things)
    return Scene(width=128, height=128, background=Background(rgb=COLORS["gray"], color="gray"), objects=shapes)


def test_candidates_are_the_things_and_the_background_of_a_drawing_and_none_of_a_photo():
    scene = _scene(("red", "circle", 0.3, 0.3), ("blue", "square", 0.7, 0.7))
    found = selector.candidates(render(scene))
    assert found is not None and found.features.shape == (len(found.ids), selector.FEATURES)
    # The background first (largest), then each thing's inside as one segment of its colour.
    for index in range(2):
        inside = visible_mask(scene, index)
        best = max(found.ids.tolist(), key=lambda sid: (inside & (found.labels == sid)).sum())
        assert (inside & (found.labels == best)).sum() > 0.7 * inside.sum()
        k = found.ids.tolist().index(best)
        assert np.allclose(found.features[k, :3] * 255, COLORS[scene.objects[index].color], atol=2)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    assert selector.candidates(noise) is None


@pytest.mark.parametrize("named, others", [
    (("pink", "heart"), [("pink", "square"), ("blue", "heart")]),
    (("yellow", "triangle"), [("yellow", "star"), ("green", "triangle")]),
])
def test_the_bundled_selector_marks_the_thing_named_not_the_ones_alike_in_a_word(nano, named, others):
    """The bundled model's own drawing marks every pink thing for "the pink heart"; the
    selector marks the heart alone."""
    places = [(0.25, 0.3), (0.72, 0.3), (0.5, 0.75)]
    scene = _scene(*[(c, k, x, y) for (c, k), (x, y) in zip([named, *others], places)])
    drawn = selector.draw(nano, f"make a mask of the {named[0]} {named[1]}", render(scene))
    assert drawn is not None and drawn.size == (128, 128)
    white = np.asarray(drawn.convert("L")) > 127
    thing = visible_mask(scene, 0)
    assert (white & thing).sum() > 0.7 * thing.sum()
    near = np.asarray(Image.fromarray(thing).filter(ImageFilter.MaxFilter(5)))
    assert (white & ~near).sum() == 0
    for index in (1, 2):
        assert (white & visible_mask(scene, index)).sum() == 0


def test_a_model_directory_without_a_selector_leaves_the_drawing_to_the_model(tiny_model):
    from incontext.models.loader import load_model

    m = load_model(tiny_model, dtype="float32")
    assert m.selector is None
    assert selector.draw(m, "make a mask of the red circle", render(_scene(("red", "circle", 0.5, 0.5)))) is None


def test_a_saved_selector_loads_with_the_same_scores(tmp_path):
    torch.manual_seed(0)
    head = selector.Selector(selector.SelectorConfig(text_dim=16, pooled_dim=8, hidden=32, heads=2)).eval()
    path = selector.save(head, tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = selector.load(tmp_path)
    txt, vec, features = torch.randn(2, 5, 16), torch.randn(2, 8), torch.rand(2, 3, selector.FEATURES)
    with torch.no_grad():
        assert torch.allclose(head(txt, vec, features), loaded(txt, vec, features), atol=2e-2)
    assert selector.load(tmp_path / "nothing") is None


def test_the_engine_answers_a_mask_request_with_the_selector_and_an_edit_by_denoising():
    """A workflow's mask request on the bundled model takes no denoising step; the same
    request as an edit, or a mask request on a photograph, denoises."""
    from incontext.engine.local import LocalEngine
    from incontext.engine.protocol import EditRequest
    from incontext.models.registry import default_registry

    registry = default_registry([], default_dir=BUNDLED_NANO_DIR)
    engine = LocalEngine(registry)
    engine.start_thread(preload=registry.default_id)
    scene = _scene(("pink", "heart", 0.25, 0.3), ("pink", "square", 0.72, 0.3))
    image = render(scene)
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    try:
        ask = lambda rid, img, mask: EditRequest(rid, registry.default_id, "make a mask of the pink heart", img, 128, 128, 0,
                                                  num_inference_steps=2, consensus=1, thing_mask=mask)
        picked = engine.submit(ask("m", image, True)).result(timeout=120)
        drawn = engine.submit(ask("e", image, False)).result(timeout=120)
        photo = engine.submit(ask("p", noise, True)).result(timeout=120)
    finally:
        asyncio.run(engine.close())
    assert picked.selected and picked.num_inference_steps == 0 and picked.transformer_evals == 0
    white = np.asarray(picked.images[0].convert("L")) > 127
    assert (white & visible_mask(scene, 0)).sum() > 0.7 * visible_mask(scene, 0).sum() and not (white & visible_mask(scene, 1)).any()
    assert not drawn.selected and drawn.num_inference_steps == 2 and drawn.transformer_evals == 2
    assert not photo.selected and photo.num_inference_steps == 2


@pytest.mark.parametrize("named, inside", [("red circle", (90, 80)), ("orange triangle", (200, 100)), ("green square", (170, 180))])
def test_the_bundled_selector_finds_each_thing_of_the_readme_picture_in_its_own_shades(nano, named, inside):
    """The README picture's colours are not the world's (a sandy orange, a teal): the thing
    named is picked, alone, at the model's working size."""
    from pathlib import Path

    from incontext import imageio

    picture = Image.open(Path(__file__).resolve().parent.parent / "examples" / "shapes.png").convert("RGB")
    fitted = imageio.fit_to_size(picture, 128, 128)
    white = np.asarray(selector.draw(nano, f"make a mask of the {named}", fitted).convert("L")) > 127
    source = np.asarray(fitted, np.int32)
    y, x = inside[0] // 2, inside[1] // 2  # (row, column) in the 256² picture
    thing = np.abs(source - source[y, x]).max(-1) <= 24
    assert white[y, x] and (white & ~thing).sum() <= 0.1 * thing.sum()
