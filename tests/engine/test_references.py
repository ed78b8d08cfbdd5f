"""Several reference images per request on the tiny Kontext model: extra context images after
the edited one, with RoPE index 2, 3, … (beyond what FLUX.1 Kontext was trained for)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from incontext import sampler
from incontext.engine.local import LocalEngine
from incontext.engine.protocol import EditRequest
from incontext.errors import InvalidInput
from incontext.models.loader import load_model


def picture(color=(200, 30, 30), size=(64, 64), box=(10, 10, 30, 30)) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 235))
    ImageDraw.Draw(img).rectangle(box, fill=color)
    return img


HAT = picture((20, 40, 220), box=(30, 4, 60, 24))  # a second image: something else, elsewhere
SCARF = picture((30, 180, 40), box=(0, 40, 64, 52))


def req(rid, seed=7, references=(), size=(64, 64), steps=4) -> EditRequest:
    return EditRequest(rid, "tiny", "put the blue box on it", picture(size=size), size[0], size[1], seed, num_inference_steps=steps,
                       references=tuple(references))


def edit_all(registry, requests, max_batch_size=4):
    async def go():
        eng = LocalEngine(registry, dtype="float32", max_batch_size=max_batch_size)
        await eng.start()
        try:
            return await asyncio.gather(*(eng.edit(r) for r in requests)), eng
        finally:
            await eng.close()

    return asyncio.run(go())


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_context_ids_give_each_image_its_own_index():
    img_ids, _ = sampler.kontext_ids(32, 48, 8, 5, 3)
    n = 2 * 3
    assert img_ids.shape == (4 * n, 3)
    assert [int(img_ids[i * n, 0]) for i in range(4)] == [0, 1, 2, 3]
    assert all(np.array_equal(img_ids[i * n : (i + 1) * n, 1:], img_ids[:n, 1:]) for i in range(4))  # same grid
    assert np.array_equal(sampler.kontext_ids(32, 48, 8, 5)[0], img_ids[: 2 * n])  # one image: as before


def test_a_second_image_reaches_the_model_and_equals_the_sampler_functions(registry, tiny_model):
    (one, two), _ = edit_all(registry, [req("one"), req("two", references=[HAT])])
    # The tiny random model reacts weakly to any context image (the edited one included), so
    # this asks only that the second image changes the output at all: were it dropped, the
    # outputs would be equal to the bit.
    assert not np.array_equal(pixels(one.images[0]), pixels(two.images[0]))
    m = load_model(tiny_model, dtype="float32")
    alone = sampler.edit(m, picture(), "put the blue box on it", seeds=[7], num_steps=4, references=(HAT,))[0]
    assert np.abs(pixels(alone) - pixels(two.images[0])).max() <= 1
    # The output follows the first image: its size, and its change map is measured against it.
    assert two.images[0].size == (64, 64) and two.change_maps[0].shape == (8, 8)


def test_a_mixed_batch_gives_each_request_what_it_gives_alone(registry):
    """Requests with as many images share a batch, each row with its own references; requests
    with another number of images run in batches of their own. No output changes either way."""
    solo = [req("a"), req("b", references=[HAT]), req("c", seed=3, references=[SCARF]), req("d", references=[HAT, SCARF])]
    alone = [edit_all(registry, [r])[0][0] for r in solo]
    crowd, eng = edit_all(registry, [replace(r, request_id=r.request_id + "2") for r in solo])
    for a, b in zip(alone, crowd):
        # A row's velocity in a batch of two differs from its own by fp32 rounding (1e-7, with
        # one image as with two), which can move a pixel by one level. The tiny model's pixels
        # hardly tell one reference from another, so the change maps (the output latents'
        # distance to the edited image's) are compared too: swapping two rows' references
        # moves them a hundred times more than this tolerance.
        assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= 1
        np.testing.assert_allclose(a.change_maps[0], b.change_maps[0], atol=1e-4)
    assert not np.array_equal(pixels(crowd[1].images[0]), pixels(crowd[3].images[0]))  # the third image counts too
    assert max(eng.stats.batch_sizes) == 2  # b and c together; a and d each alone


def test_reference_latents_are_cached_by_content(registry):
    same_hat = picture((20, 40, 220), box=(30, 4, 60, 24))  # equal to HAT, but another object
    _, eng = edit_all(registry, [req("a", references=[HAT]), req("b", seed=8, references=[same_hat])])
    # a encodes its two images; b finds both by content.
    assert (eng.latent_cache.misses, eng.latent_cache.hits) == (2, 2)


@pytest.mark.parametrize("references", [[picture(size=(32, 32))], [HAT] * 4])
def test_a_reference_at_another_size_or_a_fifth_image_is_a_clear_error(registry, references):
    with pytest.raises(InvalidInput):
        edit_all(registry, [req("bad", references=references)])
