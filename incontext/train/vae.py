"""Train the nano model's AutoencoderKL on world images (stage 1 of the nano recipe).

    incontext train vae --out runs/nano --minutes 15

Trains on random 64×64 crops (the VAE is convolutional, so crops teach it the same local
statistics at a quarter of the cost), L1 + MSE on the decoded posterior mode (the pipeline
encodes with the mode, so the autoencoder is trained as a deterministic one). At the end it measures the
latents' mean and std and stores them as the VAE's shift_factor and scaling_factor, so the
transformer sees unit-variance latents. Resumes from `out/vae.pt` if present.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from incontext.models.components import NanoConfig, build_vae
from incontext.train.checkpoint import load_checkpoint, save_checkpoint
from incontext.world.edits import make_example

log = logging.getLogger(__name__)


@dataclass
class VaeTrainConfig:
    minutes: float = 15.0
    batch: int = 16
    crop: int = 64
    lr: float = 1e-3
    warmup: int = 100
    latent_l2: float = 1e-4
    pool: int = 3000  # examples kept in memory; one is replaced every step
    latent_stats_examples: int = 256  # full images the latent shift and scale are measured on
    seed: int = 0
    # Fine-tune only the decoder: the latents (and so a transformer trained on them) stay
    # valid, while reconstructions get sharper. Used after the transformer's data is encoded.
    decoder_only: bool = False
    # With `init_from`: weight of the distance from the latents to the starting VAE's (per
    # latent, relative to their variance). A wider encoder may then add the detail the old
    # one dropped while its latents stay where the model's transformer expects them, so that
    # transformer keeps working and adapts to the new detail; the latent normalisation stays.
    anchor: float = 0.0
    log_every: int = 50
    save_every: int = 200


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _random_crops(pool: list[torch.Tensor], n: int, crop: int, rng: random.Random) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = rng.choice(pool)
        _, h, w = img.shape
        y, x = rng.randrange(0, h - crop + 1), rng.randrange(0, w - crop + 1)
        out.append(img[:, y : y + crop, x : x + crop])
    return torch.stack(out).contiguous(memory_format=torch.channels_last)


def train_vae(out: Path, model_cfg: NanoConfig, cfg: VaeTrainConfig, init_from: Path | None = None) -> Path:
    """Train (or resume from `out/vae.pt`). With no checkpoint, `init_from` (a model directory,
    e.g. the bundled one) gives the starting weights and latent normalisation: with
    `decoder_only`, its latents (and a transformer trained on them) stay valid. `model_cfg`'s
    VAE may be wider and deeper than `init_from`'s (`grow_into`): a larger decoder on the
    same latents."""
    out = Path(out)
    ckpt_path = out / "vae.pt"
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if ckpt_path.exists():  # a resumed run keeps the sizes it started with
        model_cfg = NanoConfig.from_dict(load_checkpoint(ckpt_path)["model_config"])
    vae = build_vae(model_cfg).to(memory_format=torch.channels_last)
    trained = list(vae.decoder.parameters()) if cfg.decoder_only else list(vae.parameters())
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    step = 0
    if ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        vae.load_state_dict(ck["weights"])
        if ck.get("optimizer") and ck["train_config"].get("decoder_only", False) == cfg.decoder_only:
            opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        if "scaling_factor" in (ck.get("extra") or {}):
            vae.register_to_config(shift_factor=ck["extra"]["shift_factor"], scaling_factor=ck["extra"]["scaling_factor"])
        log.info("resumed VAE from step %d", step)
    elif init_from is not None:
        from diffusers import AutoencoderKL

        start = AutoencoderKL.from_pretrained(Path(init_from) / "vae", local_files_only=True)
        grow_into(vae, start, seed=cfg.seed)
        vae.register_to_config(shift_factor=start.config.shift_factor, scaling_factor=start.config.scaling_factor)
        log.info("initialised the VAE from %s", init_from)
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
    anchor, anchor_from = None, None
    if cfg.anchor > 0:  # a resumed run keeps the anchor it started with
        anchor_from = ck["extra"].get("anchor_from") if ckpt_path.exists() else (str(init_from) if init_from is not None else None)
        anchor = _anchor_encoder(anchor_from)

    pool: list[torch.Tensor] = []
    for _ in range(cfg.pool // 2):
        ex = make_example(rng)
        pool += [_to_tensor(ex.context), _to_tensor(ex.target)]

    def extra() -> dict:
        return {**_latent_stats(vae), **({"anchor_from": anchor_from} if anchor_from else {})}

    start = time.time()
    deadline = start + cfg.minutes * 60
    vae.train()
    t0, losses = time.time(), []
    while time.time() < deadline:
        ex = make_example(rng)
        pool[rng.randrange(len(pool))] = _to_tensor(ex.context)
        pool[rng.randrange(len(pool))] = _to_tensor(ex.target)
        x = _random_crops(pool, cfg.batch, cfg.crop, rng)
        # Warm up, then cosine-decay to 5% over the time budget: the late low-LR phase sharpens edges.
        frac = (time.time() - start) / (deadline - start)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        # Decode the posterior's mean, not a sample: inference encodes with the mode, and
        # sampling noise made early training several times slower (the decoder saw noise
        # until the tiny KL weight had shrunk the variance).
        if cfg.decoder_only:
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode()
        else:
            z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        rec = (y - x).abs().mean() + 2.0 * ((y - x) ** 2).mean()
        loss = rec + cfg.latent_l2 * (z**2).mean()  # keeps latents near unit scale
        if anchor is not None:
            with torch.no_grad():
                z_old = anchor(x)
            loss = loss + cfg.anchor * ((z - z_old) ** 2).mean() / z_old.var()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        mse = ((y.detach().clamp(-1, 1) - x) ** 2).mean().item() / 4.0  # in [0,1] units
        losses.append(-10 * math.log10(max(mse, 1e-10)))
        if step % cfg.log_every == 0:
            log.info("vae step %d  psnr(train crops) %.2f dB  lr %.2e  %.2fs/step", step, float(np.mean(losses)), lr, (time.time() - t0) / cfg.log_every)
            t0, losses = time.time(), []
        if step % cfg.save_every == 0:
            save_checkpoint(ckpt_path, step=step, model_config=asdict(model_cfg), train_config=asdict(cfg), weights=vae.state_dict(), optimizer=opt,
                            extra=extra())

    if not cfg.decoder_only and anchor is None:  # else the latents stay in the space they started in
        _set_latent_stats(vae, rng, cfg.latent_stats_examples)
    save_checkpoint(ckpt_path, step=step, model_config=asdict(model_cfg), train_config=asdict(cfg), weights=vae.state_dict(), optimizer=opt,
                    extra=extra())
    return ckpt_path


@torch.no_grad()
def grow_into(vae, start, seed: int = 0) -> None:
    """Load `start`'s weights into `vae`, a copy of its architecture that may be wider (every
    level's channels the same whole multiple of `start`'s) and deeper (more ResNet blocks a
    level), so that `vae` computes what `start` computes, encoder and decoder.

    Why this is exact: a channel is widened by copies of itself, and a layer reading k copies
    weighs each by 1/k, so it sums what it read before. With one normalisation group the
    copies leave a layer's mean and variance as they were. A block `start` lacks is a
    ResNet block whose last convolution is zero: it adds nothing to its input. The copies'
    outgoing weights differ by a noise that sums to zero over them (Net2Net's trick), so the
    function is unchanged but training can tell the copies apart; identical copies would
    receive identical gradients and stay one channel."""
    if start.config.norm_num_groups != 1 or vae.config.norm_num_groups != 1:
        raise ValueError("growing an autoencoder exactly needs one normalisation group")
    gen = torch.Generator().manual_seed(seed)
    old = start.state_dict()
    for name, p in vae.state_dict().items():
        if name not in old:  # a new block: make it the identity
            if name.endswith(("conv2.weight", "conv2.bias")):
                p.zero_()
            continue
        t = old[name].to(p.dtype)
        if t.shape[0] != p.shape[0]:
            t = t.repeat(p.shape[0] // t.shape[0], *[1] * (t.dim() - 1))
        if t.dim() == 4 and t.shape[1] != p.shape[1]:
            k = p.shape[1] // t.shape[1]
            copies = t.repeat(1, k, 1, 1).view(t.shape[0], k, t.shape[1], *t.shape[2:]) / k
            noise = torch.randn(copies.shape, generator=gen) * (t.std() / k)
            t = (copies + noise - noise.mean(dim=1, keepdim=True)).reshape(t.shape[0], -1, *t.shape[2:])
        if t.shape != p.shape:
            raise ValueError(f"{name}: {tuple(old[name].shape)} does not grow into {tuple(p.shape)}")
        p.copy_(t)


def grown_config(model_dir: Path, base: NanoConfig, widen: int = 1, deepen: int = 0) -> NanoConfig:
    """`base` with the VAE sizes of `model_dir`'s, `widen` times the channels and `deepen` more
    blocks a level: the VAE `train_vae(..., init_from=model_dir)` grows that one into."""
    import dataclasses
    import json

    start = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return dataclasses.replace(base, vae_channels=tuple(c * widen for c in start["block_out_channels"]),
                               vae_layers=start["layers_per_block"] + deepen, latent_channels=start["latent_channels"])


def _anchor_encoder(model_dir):
    """The starting VAE's encoder, frozen: what `anchor` keeps the latents near."""
    from diffusers import AutoencoderKL

    if model_dir is None:
        raise ValueError("anchor needs init_from: the model directory whose latents to stay near")
    old = AutoencoderKL.from_pretrained(Path(model_dir) / "vae", local_files_only=True).eval().requires_grad_(False)
    return lambda x: old.encode(x).latent_dist.mode()


def _latent_stats(vae) -> dict:
    """The latent normalisation, once measured (a fresh VAE has the placeholders 0 and 1)."""
    if vae.config.scaling_factor == 1.0 and vae.config.shift_factor == 0.0:
        return {}
    return {"shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor}


@torch.no_grad()
def _set_latent_stats(vae, rng: random.Random, n: int = 256) -> None:
    """shift = mean, scale = 1/std of the posterior modes over fresh full images."""
    vae.eval()
    zs = []
    for i in range(0, n, 16):
        batch = torch.stack([_to_tensor(make_example(rng, size=(128, 128)).target) for _ in range(min(16, n - i))])
        zs.append(vae.encode(batch).latent_dist.mode())
    z = torch.cat(zs)
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    log.info("latent shift %.4f scale %.4f", vae.config.shift_factor, vae.config.scaling_factor)


@torch.no_grad()
def eval_vae_psnr(vae, n: int = 64, seed: int = 1234) -> float:
    """Reconstruction PSNR (dB) on held-out full world images."""
    rng = random.Random(seed)
    vae.eval()
    errs = []
    for _ in range(n // 16):
        x = torch.stack([_to_tensor(make_example(rng, size=(128, 128)).context) for _ in range(16)])
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        y = ((y + 1) * 127.5).round() / 127.5 - 1  # as the pipeline rounds to 8 bits
        errs.append((((y - x) / 2) ** 2).mean(dim=(1, 2, 3)))
    mse = torch.cat(errs)
    return float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def psnr_by_family(vae, n: int = 16, seed: int = 4321, families: tuple[str, ...] | None = None) -> dict[str, float]:
    """Round-trip PSNR (dB) of held-out targets, family by family (all 16 by default): where
    the autoencoder caps what any transformer decoded through it can score (thin strokes:
    text, outline)."""
    from incontext.world.edits import FAMILIES

    vae.eval()
    scores = {}
    for family in families or FAMILIES:
        rng = random.Random(f"{seed}-{family}")
        x = torch.stack([_to_tensor(make_example(rng, family=family, size=(128, 128)).target) for _ in range(n)])
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        y = ((y + 1) * 127.5).round() / 127.5 - 1
        scores[family] = float((-10 * torch.log10((((y - x) / 2) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10))).mean())
    return scores
