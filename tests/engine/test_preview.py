"""Previews: a fixed latent-to-RGB map fitted at load time, reported on the steps asked for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from incontext.engine import preview
from incontext.engine.local import LocalEngine
from incontext.engine.protocol import EditRequest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes.png"


def picture(color=(200, 30, 30), size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 235))
    ImageDraw.Draw(img).rectangle((10, 10, 40, 40), fill=color)
    return img


def test_preview_steps_are_evenly_spaced_and_never_the_last():
    assert [d for d in range(1, 21) if preview.due(d, 20, 4)] == [4, 8, 12, 16]
    assert [d for d in range(1, 5) if preview.due(d, 4, 4)] == [1, 2, 3]
    assert not any(preview.due(d, 20, 0) for d in range(1, 21))


def test_the_projection_shows_the_bundled_models_latents_in_their_colours():
    """From an input's own latents, a preview is the input at 1/8 scale: nearer to it than
    the input's mean colour is (a plain linear map is not, on this autoencoder)."""
    from incontext import sampler
    from incontext.models.loader import load_model
    from incontext.models.registry import default_registry

    m = load_model(default_registry().resolve(None).directory, dtype="float32")
    image = Image.open(EXAMPLE).convert("RGB").resize((128, 128))
    shown = preview.render(sampler.encode_images(m, [image]), 128, 128, m.vae_scale_factor, preview.fit_projection(m))
    assert shown.shape == (16, 16, 3) and shown.dtype == np.uint8
    target = np.asarray(image.resize((16, 16), Image.BOX), dtype=float)
    error = np.abs(shown - target).mean()
    flat = np.abs(target - target.mean(axis=(0, 1))).mean()
    assert error < 0.75 * flat, (error, flat)


def test_previews_are_reported_with_progress(registry, one_thread):
    seen = []

    async def go():
        eng = LocalEngine(registry, dtype="float32")
        await eng.start()
        request = EditRequest("p", "tiny", "make it blue", picture(), 64, 64, 3, num_inference_steps=6, previews=2)
        await eng.edit(request, lambda p: seen.append(p))
        await eng.close()

    asyncio.run(go())
    assert [p.done for p in seen] == [1, 2, 3, 4, 5, 6]
    assert [p.done for p in seen if p.preview is not None] == [2, 4]
    assert all(p.preview.shape == (8, 8, 3) for p in seen if p.preview is not None)
