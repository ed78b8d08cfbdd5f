"""The step cache: the pure schedule policy, and the engine reusing velocities on a tiny model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from incontext import sampler
from incontext.engine import stepcache
from incontext.engine.local import LocalEngine
from incontext.engine.protocol import EditRequest
from incontext.engine.stepcache import StepCacheConfig

# ---------------------------------------------------------------- the policy


def test_fast_preset_halves_the_evaluations_at_the_usual_step_counts():
    fast = stepcache.PRESETS["fast"]
    assert fast.compute_steps(20) == {0, 1, 2, 3, 6, 9, 12, 15, 18, 19}
    for steps in (20, 24, 28, 30):
        assert steps / fast.evals(steps) >= 1.8


def test_first_and_last_steps_are_always_computed():
    config = StepCacheConfig(compute_every=4, always_first=2, always_last=3)
    for steps in range(1, 30):
        computed = config.compute_steps(steps)
        assert computed <= set(range(steps))
        assert set(range(min(2, steps))) <= computed
        assert set(range(max(0, steps - 3), steps)) <= computed
        # Never more than compute_every − 1 reused steps in a row.
        gaps = np.diff(sorted(computed))
        assert (gaps <= 4).all()


def test_compute_every_one_is_the_exact_sampler_and_short_runs_compute_everything():
    assert StepCacheConfig(compute_every=1).compute_steps(12) == set(range(12))
    assert StepCacheConfig(compute_every=3, always_first=3, always_last=2).compute_steps(4) == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs", [{"compute_every": 0}, {"always_first": 0}, {"always_last": -1}])
def test_a_config_that_cannot_work_is_refused(kwargs):
    with pytest.raises(ValueError):
        StepCacheConfig(**kwargs)


def test_resolve_names_configs_and_off():
    assert stepcache.resolve("fast") is stepcache.PRESETS["fast"]
    assert stepcache.resolve("2,1,1") == StepCacheConfig(compute_every=2, always_first=1, always_last=1)
    assert stepcache.resolve("off") is None and stepcache.resolve(None) is None
    config = StepCacheConfig()
    assert stepcache.resolve(config) is config
    with pytest.raises(ValueError, match="unknown step cache"):
        stepcache.resolve("turbo")


# ---------------------------------------------------------------- the engine

CACHE = StepCacheConfig(compute_every=2, always_first=1, always_last=1)  # 6 steps → {0, 1, 3, 5}


pytestmark = pytest.mark.usefixtures("one_thread")


def picture(color=(200, 30, 30), size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 235))
    ImageDraw.Draw(img).rectangle((10, 10, 30, 30), fill=color)
    return img


def req(rid, seed, prompt="make it blue", image=None, n=1, steps=6, size=(64, 64)):
    return EditRequest(rid, "tiny", prompt, image or picture(size=size), size[0], size[1], seed, num_images=n, num_inference_steps=steps)


def run_engine(registry, requests, step_cache=CACHE, max_batch_size=4):
    async def go():
        eng = LocalEngine(registry, dtype="float32", max_batch_size=max_batch_size, step_cache=step_cache)
        await eng.start()
        results = await asyncio.gather(*(eng.edit(r) for r in requests))
        await eng.close()
        return results, eng

    return asyncio.run(go())


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


@torch.no_grad()
def reference_edit(model_dir, request: EditRequest, config: StepCacheConfig) -> Image.Image:
    """The cached sampler written out with the plain sampler functions, one image alone."""
    from incontext.models.loader import load_model

    m = load_model(model_dir, dtype="float32", max_sequence_length=32)
    txt, vec = sampler.encode_text(m, [request.prompt])
    img_cond = sampler.encode_images(m, [request.image])
    img = sampler.initial_latents(m, request.seed, img_cond, request.height, request.width)
    img_ids, txt_ids = sampler.kontext_ids(request.height, request.width, m.vae_scale_factor, txt.shape[1])
    steps = request.num_inference_steps
    timesteps, sigmas = sampler.schedule(steps, img.shape[1], m.scheduler_config)
    v = None
    for i in range(steps):
        if i in config.compute_steps(steps):
            v = sampler.predict_velocity(m, img=img, img_cond=img_cond, txt=txt, vec=vec, timesteps=torch.tensor([timesteps[i]]),
                                         guidance=torch.tensor([request.guidance_scale]), img_ids=img_ids, txt_ids=txt_ids)
        img = sampler.euler_step(img, v, torch.tensor([sigmas[i]]), torch.tensor([sigmas[i + 1]]))
    return sampler.decode(m, img, request.height, request.width)[0]


def test_skipped_steps_reuse_the_last_velocity_and_count_fewer_evaluations(registry, tiny_model):
    (cached,), eng = run_engine(registry, [req("a", 7)])
    assert cached.transformer_evals == 4 and cached.num_inference_steps == 6
    assert eng.stats.transformer_evals == 4 and eng.stats.reused_evals == 2
    assert eng.stats.transformer_passes == 4 and eng.stats.steps == 6  # skipped steps run no pass at all
    assert np.array_equal(pixels(cached.images[0]), pixels(reference_edit(tiny_model, req("a", 7), CACHE)))
    (exact,), _ = run_engine(registry, [req("a", 7)], step_cache=None)
    assert exact.transformer_evals == 6
    assert not np.array_equal(pixels(cached.images[0]), pixels(exact.images[0]))


def test_same_image_alone_or_in_a_batch_with_other_schedules(registry):
    (alone,), _ = run_engine(registry, [req("same", 11)])
    (again,), _ = run_engine(registry, [req("same", 11)])
    crowd, eng = run_engine(registry, [
        req("other", 1, "remove the square", picture((20, 200, 20)), n=2, steps=9),  # another schedule, two images
        req("same", 11),
        req("short", 3, steps=3),
        req("wide", 11, size=(80, 48)),
    ])
    assert np.array_equal(pixels(alone.images[0]), pixels(again.images[0]))
    # Equal up to float rounding: CPU matmul kernels block differently for other batch
    # sizes (~1e-6 in a velocity), which can move a pixel by one level, never more.
    diff = np.abs(pixels(alone.images[0]).astype(int) - pixels(crowd[1].images[0]).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert max(eng.stats.batch_sizes) > 1 and min(eng.stats.batch_sizes) < 4  # shared passes, some rows left out
    assert [r.transformer_evals for r in crowd] == [CACHE.evals(9), 4, CACHE.evals(3), 4]
    assert eng.stats.transformer_evals == 2 * CACHE.evals(9) + 4 + CACHE.evals(3) + 4


def test_the_step_cache_can_be_set_per_model_and_later(registry):
    async def go():
        eng = LocalEngine(registry, dtype="float32")
        await eng.start()
        exact = await eng.edit(req("exact", 1))
        eng.set_step_cache("fast", model_id="tiny")
        assert eng.step_cache is None and eng.step_cache_for("tiny") is stepcache.PRESETS["fast"]
        fast = await eng.edit(req("fast", 1, steps=20))
        eng.set_step_cache(None)
        back = await eng.edit(req("back", 1))
        await eng.close()
        return exact, fast, back

    exact, fast, back = asyncio.run(go())
    assert exact.transformer_evals == 6 and back.transformer_evals == 6
    assert fast.transformer_evals == 10
    assert np.array_equal(pixels(exact.images[0]), pixels(back.images[0]))


def test_progress_is_still_reported_every_step(registry):
    seen = []

    async def go():
        eng = LocalEngine(registry, dtype="float32", step_cache=CACHE)
        await eng.start()
        await eng.edit(req("p", 1), lambda progress: seen.append(progress.done))
        await eng.close()

    asyncio.run(go())
    assert seen == [1, 2, 3, 4, 5, 6]
