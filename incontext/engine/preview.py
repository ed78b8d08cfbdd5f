"""Cheap previews of a running edit: latents → RGB by one fixed map, no VAE.

A preview through the VAE would cost about a denoising step each time. Instead each model
gets, when it loads, a least-squares fit of RGB on its latent channels and their pairwise
products (C + C(C+1)/2 + 1 features → 3), from a few images through its own encoder; a
preview is then one small matmul at the latent resolution (16×16 for a 128² nano edit).
Measured on the bundled nano model (examples/shapes.png, mean absolute error per channel
at 16×16, of 255): a plain linear map (C → 3) 52, worse than the image's mean colour (34),
as its small autoencoder is far from linear in colour; with the products, 20. The calibration
images are the procedural world's scenes (flat colours, sharp edges): the bundled model's
own domain, and content any autoencoder represents. Nothing is stored.

    projection = fit_projection(models)                          # at load time, ~0.5 s
    rgb = render(x0, height, width, vae_scale_factor, projection)  # (h, w, 3) uint8
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from incontext import sampler

CALIBRATION_SIZE = 128  # pixels per side: 16×16 latents at scale 8
CALIBRATION_IMAGES = 24  # 6 144 latent pixels for 153 features (C = 16)


def calibration_images(seed: int = 0, size: int = CALIBRATION_SIZE, count: int = CALIBRATION_IMAGES) -> list[Image.Image]:
    from incontext.world.edits import random_scene
    from incontext.world.scene import render as render_scene

    rng = random.Random(seed)
    return [render_scene(random_scene(rng, (size, size))) for _ in range(count)]


def features(z: torch.Tensor) -> torch.Tensor:
    """(P, C) latent pixels → (P, C + C(C+1)/2 + 1): the channels, their products, a bias."""
    i, j = torch.triu_indices(z.shape[1], z.shape[1])
    return torch.cat([z, z[:, i] * z[:, j], torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)


@torch.no_grad()
def fit_projection(m, seed: int = 0, encode=sampler.encode_images) -> torch.Tensor:
    """(features, 3): RGB in [-1, 1] ≈ features(latents) @ projection, for the model's
    normalised latents (as the transformer sees them). `encode(m, images)`: the model
    family's encoder to packed latents (engine/families)."""
    images = calibration_images(seed)
    size = images[0].width
    z = sampler.unpack(encode(m, images).float(), size, size, m.vae_scale_factor)  # (B, C, h, w)
    rgb = F.adaptive_avg_pool2d(sampler.image_to_tensor(images), z.shape[-2:])  # (B, 3, h, w)
    x = features(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x, y).solution


def render(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int, projection: torch.Tensor) -> np.ndarray:
    """Packed latents (1, N, 4C) of an output of `height` × `width` → (h, w, 3) uint8."""
    z = sampler.unpack(latents.float(), height, width, vae_scale_factor)[0]  # (C, h, w)
    c, h, w = z.shape
    rgb = features(z.permute(1, 2, 0).reshape(-1, c)) @ projection
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).reshape(h, w, 3).numpy()


def due(done: int, total: int, previews: int) -> bool:
    """Whether step `done` of `total` is one of `previews` evenly spaced preview steps (never
    the last: the result itself follows)."""
    if previews <= 0 or not 0 < done < total:
        return False
    return done * (previews + 1) // total > (done - 1) * (previews + 1) // total
