"""The in-process engine on a tiny model: batching, determinism, progress, cancellation, caches."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from incontext.engine.local import LocalEngine
from incontext.engine.protocol import EditRequest
from incontext.errors import Cancelled, InvalidInput, ModelError
from incontext.testing import declaring


def picture(color=(200, 30, 30), size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 235))
    ImageDraw.Draw(img).rectangle((10, 10, 30, 30), fill=color)
    return img


def req(rid, seed, prompt="make it blue", image=None, n=1, steps=5, guidance=3.5, size=(64, 64)):
    image = image or picture(size=size)
    return EditRequest(rid, "tiny", prompt, image, size[0], size[1], seed, num_images=n, num_inference_steps=steps, guidance_scale=guidance)


def run(coro):
    return asyncio.run(coro)


def test_same_seed_same_image_whatever_else_is_in_the_batch(registry):
    async def go():
        eng = LocalEngine(registry, dtype="float32", max_batch_size=4)
        await eng.start()
        alone = await eng.edit(req("alone", 7))
        crowd = await asyncio.gather(
            eng.edit(req("other1", 1, "remove the square", picture((20, 200, 20)), n=2)),
            eng.edit(req("same", 7)),
            eng.edit(req("other2", 3, guidance=9.0)),
            eng.edit(req("wide", 7, size=(80, 48))),
        )
        await eng.close()
        return alone, crowd, eng.stats

    alone, crowd, stats = run(go())
    assert np.array_equal(np.asarray(alone.images[0]), np.asarray(crowd[1].images[0]))
    assert max(stats.batch_sizes) > 1  # the crowd really shared batches
    assert crowd[0].seeds == [1, 2] and len(crowd[0].images) == 2
    assert crowd[3].images[0].size == (80, 48)


def test_another_keys_edit_overtakes_a_backlog_and_comes_out_the_same(registry):
    """Owners share each step: a key's single edit, submitted behind another key's batch of
    eight images, finishes first, and sitting steps out changes no pixel of anyone's output."""

    async def go():
        eng = LocalEngine(registry, dtype="float32", max_batch_size=8)
        await eng.start()
        alone = await eng.edit(req("alone", 7, steps=6))
        hog_alone = await eng.edit(req("hog-alone", 1, "remove the square", picture((20, 200, 20)), n=8, steps=6))
        finished = []

        async def timed(r):
            res = await eng.edit(r)
            finished.append(r.request_id)
            return res

        hog = asyncio.ensure_future(timed(replace(req("hog", 1, "remove the square", picture((20, 200, 20)), n=8, steps=6), owner="key-a")))
        await asyncio.sleep(0)
        single = await timed(replace(req("single", 7, steps=6), owner="key-b"))
        hog_res = await hog
        await eng.close()
        return alone, single, hog_alone, hog_res, finished

    alone, single, hog_alone, hog, finished = run(go())
    assert finished == ["single", "hog"]
    assert np.array_equal(np.asarray(alone.images[0]), np.asarray(single.images[0]))
    for a, b in zip(hog_alone.images, hog.images):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # batch-size rounding only


def test_progress_is_reported_every_step(registry):
    seen = []

    async def go():
        eng = LocalEngine(registry, dtype="float32")
        await eng.start()
        res = await eng.edit(req("p", 1, steps=4), lambda p: seen.append((p.done, p.total, p.preview)))
        await eng.close()
        return res

    res = run(go())
    assert [(done, total) for done, total, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(shown is None for _, _, shown in seen)  # none asked for
    assert res.num_inference_steps == 4 and res.transformer_evals == 4


def test_cancel_stops_a_running_request_between_steps(registry):
    async def go():
        eng = LocalEngine(registry, dtype="float32")
        await eng.start()
        steps_seen = []
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def progress(p):
            steps_seen.append(p.done)
            if p.done == 2:
                loop.call_soon_threadsafe(started.set)

        task = asyncio.ensure_future(eng.edit(req("c", 1, steps=200), progress))
        await started.wait()
        eng.cancel("c")
        with pytest.raises(Cancelled):
            await task
        after = await eng.edit(req("next", 2, steps=2))  # the engine keeps serving
        await eng.close()
        return steps_seen, after

    steps_seen, after = run(go())
    assert max(steps_seen) < 200
    assert len(after.images) == 1


def test_bad_size_is_a_clear_error(registry):
    async def go():
        eng = LocalEngine(registry, dtype="float32")
        await eng.start()
        try:
            await eng.edit(EditRequest("bad", "tiny", "x", picture(size=(60, 60)), 60, 60, 0))
        finally:
            await eng.close()

    with pytest.raises(InvalidInput):
        run(go())


def test_repeated_prompts_and_images_hit_the_caches(registry):
    async def go():
        eng = LocalEngine(registry, dtype="float32")
        await eng.start()
        await eng.edit(req("1", 1))
        await eng.edit(req("2", 2))
        await eng.close()
        return eng

    eng = run(go())
    assert eng.text_cache.hits >= 1 and eng.latent_cache.hits >= 1


def test_results_carry_engine_timings_and_the_stats_count_passes(registry):
    async def go():
        eng = LocalEngine(registry, dtype="float32")
        await eng.start()
        res = await eng.edit(req("t", 1, steps=3))
        await eng.close()
        return res, eng.stats

    res, stats = run(go())
    assert res.timings_ms["total"] >= res.timings_ms["queued"] >= 0
    assert stats.steps == stats.transformer_passes == stats.transformer_evals == 3 and stats.reused_evals == 0
    assert 0 < stats.transformer_seconds <= stats.busy_seconds


def test_unchanged_batches_reuse_their_stacked_inputs(registry, monkeypatch):
    from incontext import sampler

    calls = []
    real = sampler.kontext_ids
    monkeypatch.setattr(sampler, "kontext_ids", lambda *a: calls.append(a) or real(*a))

    async def go():
        eng = LocalEngine(registry, dtype="float32", max_batch_size=4)
        await eng.start()
        await asyncio.gather(eng.edit(req("a", 1, steps=6)), eng.edit(req("b", 2, steps=6)))
        await eng.close()

    run(go())
    assert len(calls) == 1  # not once per step


def test_the_engine_thread_loads_the_model_and_a_model_that_does_not_load_fails_start(registry, tmp_path):
    import threading

    from incontext.models.registry import Registry, preset_for_directory

    loaded_on: list[str] = []

    class Watching(LocalEngine):
        def load(self, model_id):
            loaded_on.append(threading.current_thread().name)
            return super().load(model_id)

    async def good():
        eng = Watching(registry, dtype="float32")
        await eng.start()
        try:
            assert eng.is_ready()
            result = await eng.edit(req("loaded", 0, steps=2))
            assert result.images[0].size == (64, 64)
        finally:
            await eng.close()

    run(good())
    # All torch work on the engine's own thread: another live thread that had run parallel
    # ops would slow its every op (LocalEngine.start_thread).
    assert loaded_on and set(loaded_on) == {"incontext-engine"}

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    reg = Registry(default_id="broken")
    reg.add(preset_for_directory(broken, id="broken"))

    async def bad():
        eng = LocalEngine(reg, dtype="float32")
        try:
            await eng.start()
        finally:
            assert not eng.is_ready()
            await eng.close()

    with pytest.raises(ModelError, match="missing"):
        run(bad())


def test_each_output_comes_with_where_its_latents_moved_and_the_rendered_input(registry):
    """The change maps the engine reports are the sampler's own: preserve.py builds the
    output from them, so they must match what one request alone computes."""
    from incontext import sampler
    from incontext.models.loader import load_model

    async def go():
        eng = LocalEngine(registry, dtype="float32")
        await eng.start()
        res = await eng.edit(req("maps", 11, n=2, size=(80, 48)))
        # a caller that will not compare with the rendering (preserve "off") is spared its decode
        unrendered = await eng.edit(replace(req("plain", 11, n=2, size=(80, 48)), render_context=False))
        await eng.close()
        return res, unrendered

    res, unrendered = run(go())
    assert unrendered.rendered_context is None
    np.testing.assert_allclose(unrendered.change_maps[1], res.change_maps[1], atol=1e-5)
    assert len(res.change_maps) == 2 and res.change_maps[0].shape == (6, 10)  # 48×80 pixels at 8×
    m = load_model(registry.resolve("tiny").directory, dtype="float32")
    latents, cond = sampler.denoise(m, picture(size=(80, 48)), "make it blue", seeds=[12], num_steps=5)
    alone = sampler.change_map(latents, cond, 48, 80, m.vae_scale_factor)[0]
    np.testing.assert_allclose(res.change_maps[1], alone, atol=1e-3)
    # and the autoencoder's rendering of the input, which preserve.py tells its error from edits by
    rendered = sampler.decode(m, cond, 48, 80)[0]
    assert res.rendered_context.size == (80, 48)
    assert np.abs(np.asarray(res.rendered_context, dtype=int) - np.asarray(rendered, dtype=int)).max() <= 1


def test_consensus_outputs_are_the_median_of_their_draws_from_the_model_or_the_request(registry, tiny_model):
    """A request with consensus 3 gets, per output, the median of three denoisings with
    draw_seeds(seed + i, 3); a model directory that declares consensus gets it by default;
    a count outside 1–8 is refused before any work."""
    import torch

    from incontext import sampler
    from incontext.models.loader import load_model
    from incontext.models.registry import Registry, preset_for_directory

    m = load_model(tiny_model, dtype="float32", max_sequence_length=registry.resolve("tiny").max_sequence_length)
    image = picture()

    def expected(seed: int) -> np.ndarray:
        lat, _ = sampler.denoise(m, image, "make it blue", seeds=sampler.draw_seeds(seed, 3), num_steps=4)
        draws = [np.asarray(im) for im in sampler.decode(m, lat, 64, 64)]
        merged = np.asarray(sampler.decode(m, sampler.merge_draws(lat, 3), 64, 64)[0])
        return merged, draws

    voting = tiny_model.parent / "tiny_voting"
    if not voting.exists():
        declaring(tiny_model, voting, consensus=3)
    declared = Registry(default_id="voting")
    declared.add(preset_for_directory(voting, id="voting"))

    async def go():
        eng = LocalEngine(registry, dtype="float32", max_batch_size=8)
        await eng.start()
        asked = await eng.edit(replace(req("asked", 11, n=2, steps=4), consensus=3))
        single = await eng.edit(req("single", 11, steps=4))
        with pytest.raises(InvalidInput, match="consensus"):
            await eng.edit(replace(req("too-many", 11, steps=4), consensus=9))
        await eng.close()
        eng2 = LocalEngine(declared, dtype="float32", max_batch_size=8)
        await eng2.start()
        by_default = await eng2.edit(replace(req("default", 11, steps=4), model_id="voting"))
        await eng2.close()
        return asked, single, by_default

    asked, single, by_default = run(go())
    assert asked.seeds == [11, 12] and len(asked.images) == 2 and asked.transformer_evals == 3 * single.transformer_evals
    for i, out in enumerate(asked.images):
        merged, draws = expected(11 + i)
        assert np.abs(np.asarray(out, dtype=int) - merged.astype(int)).max() <= 1
        assert any(not np.array_equal(draws[0], d) for d in draws[1:])  # the draws differ: the median is not one of them by luck
    assert np.abs(np.asarray(single.images[0], dtype=int) - expected(11)[1][0].astype(int)).max() <= 1  # draw 0 is the single-draw output
    assert np.abs(np.asarray(by_default.images[0], dtype=int) - expected(11)[0].astype(int)).max() <= 1


def test_a_true_cfg_model_edits_as_the_sampler_does_in_any_batch(tiny_model, tmp_path):
    """A directory that declares true CFG (incontext.json `true_cfg_scale`): each row's twin without
    the instruction rides in the engine's batch, and the output is the sampler's, whatever else runs.
    A request that turns it off (EditRequest.true_cfg, as some workflows do) gets the plain model's
    output in the same batch."""
    from incontext import sampler
    from incontext.engine.invariance import make_batch_invariant
    from incontext.models.loader import load_model
    from incontext.models.registry import Registry, preset_for_directory

    guided = declaring(tiny_model, tmp_path / "tiny_guided", true_cfg_scale=2.0)
    registry = Registry(default_id="guided")
    registry.add(preset_for_directory(guided, id="guided"))
    m = load_model(guided, dtype="float32", max_sequence_length=registry.resolve("guided").max_sequence_length)
    make_batch_invariant(m.transformer)
    expected = np.asarray(sampler.edit(m, picture(), "make it blue", seeds=[7], num_steps=4)[0])
    m.true_cfg = sampler.TrueCfg()
    unguided = np.asarray(sampler.edit(m, picture(), "make it blue", seeds=[7], num_steps=4)[0])

    async def go():
        eng = LocalEngine(registry, dtype="float32", max_batch_size=4)
        await eng.start()
        crowd = await asyncio.gather(
            eng.edit(replace(req("other", 1, "remove the square", picture((20, 200, 20)), n=2, steps=4), model_id="guided")),
            eng.edit(replace(req("same", 7, steps=4), model_id="guided")),
            eng.edit(replace(req("plain", 7, steps=4), model_id="guided", true_cfg=False)),
        )
        await eng.close()
        return crowd, eng.stats

    crowd, stats = run(go())
    assert np.array_equal(np.asarray(crowd[1].images[0]), expected)
    assert np.array_equal(np.asarray(crowd[2].images[0]), unguided)
    assert not np.array_equal(expected, unguided)
    assert max(stats.batch_sizes) > 1
