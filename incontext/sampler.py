"""The flow-matching sampler as plain functions: prepare → schedule → denoise → unpack.

Kontext conditioning: the context image's latent tokens are appended to the target's
sequence (their RoPE ids carry index 1 in the first axis) and the prediction is sliced
back to the target's length. Further reference images are appended after it with index 2,
3, …: the sequence concatenation allows it, but FLUX.1 Kontext was trained with one context
image, so what the model makes of the others is beyond its training (docs/engine.md).
Every function takes a batch, and every row of the batch may have its own prompt, context
image, guidance, timestep and noise, so the engine can put several requests in one forward
pass. With one row, the result equals stock diffusers
`FluxKontextPipeline` on the same directory (same seed, steps and guidance).

Shapes: img (B, N, 4C) packed target latents; img_cond (B, N, 4C) packed context latents;
txt (B, L, D) text states; vec (B, P) pooled text; img_ids (2N, 3); txt_ids (L, 3). With k
reference images (all at the output's size), img_cond is (B, kN, 4C) and img_ids ((1 + k)N, 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class FlowStart:
    """Where sampling starts at t = 1, as the model directory declares it (incontext.json).

    "noise": FLUX's flow, x1 = noise (the bundled nano model's). "context": x1 = context
    latents + `noise`·noise, a flow nano can be trained with (`train transformer
    --flow-start context`): a token the edit does not touch starts where it should end, so
    the model only has to move what the instruction names. Stock
    `FluxKontextPipeline` reproduces either when given these starting latents (`latents=`)."""

    kind: str = "noise"
    noise: float = 1.0

    def __post_init__(self):
        if self.kind not in ("noise", "context"):
            raise ValueError(f"flow_start must be 'noise' or 'context', not {self.kind!r}")
        if not 0.0 <= self.noise <= 10.0:
            raise ValueError(f"start_noise must be within 0–10, not {self.noise}")


@dataclass(frozen=True)
class TrueCfg:
    """True classifier-free guidance against no instruction, as the model directory declares it
    (incontext.json `true_cfg_scale`, `true_cfg_gate`): v = v(∅) + scale·(v(prompt) − v(∅)), the
    stock pipeline's `true_cfg_scale` with `negative_prompt=""`. A model trained to return its
    context without an instruction predicts "change nothing" there, so the scale amplifies
    exactly what the instruction asks for (what it buys and costs: docs/training.md).

    `gate`: a row whose x0, as this step predicts it (x_t − σ·v), moved from the context by more
    than this (the median of `change_map`) is a global edit, which amplification overshoots (a
    desaturation pushed past grey comes back in the opposite colours): that row steps with its
    plain prediction. Stock `FluxKontextPipeline` has no gate, so it reproduces a row the gate
    never stopped with `true_cfg_scale`, and one it stopped at every step without."""

    scale: float = 1.0  # 1: off
    gate: float = math.inf

    def __post_init__(self):
        if not 1.0 <= self.scale <= 10.0:
            raise ValueError(f"true_cfg_scale must be within 1–10, not {self.scale}")
        if not self.gate > 0:
            raise ValueError(f"true_cfg_gate must be positive, not {self.gate}")

    @property
    def on(self) -> bool:
        return self.scale > 1.0


@dataclass
class Models:
    """A loaded Kontext model: the stock modules plus what sampling needs from their configs."""

    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    transformer: torch.nn.Module
    scheduler_config: dict
    max_sequence_length: int = 512
    dtype: torch.dtype = torch.float32  # transformer compute dtype
    device: torch.device = torch.device("cpu")
    flow_start: FlowStart = FlowStart()
    true_cfg: TrueCfg = TrueCfg()
    negative: tuple[torch.Tensor, torch.Tensor] | None = None  # `empty_text`'s, once computed
    # The model directory's segment-picking head (incontext/selector.py), if it ships one.
    selector: torch.nn.Module | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4


# ---------------------------------------------------------------- prepare


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): 2×2 latent patches become tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Inverse of `pack` for an image of height × width pixels."""
    b, _, d = tokens.shape
    h, w = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h_tokens: int, w_tokens: int, index: int) -> torch.Tensor:
    """RoPE positions (index, row, col) of a h_tokens × w_tokens grid: (h·w, 3)."""
    ids = torch.zeros(h_tokens, w_tokens, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h_tokens)[:, None]
    ids[..., 2] = torch.arange(w_tokens)[None, :]
    return ids.reshape(h_tokens * w_tokens, 3)


def kontext_ids(height: int, width: int, vae_scale_factor: int, text_len: int, contexts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids for target + `contexts` context images, txt_ids) for an output of height × width
    pixels: the target has index 0, context image i index i (1, 2, …)."""
    ht, wt = height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)
    img = torch.cat([image_ids(ht, wt, i) for i in range(contexts + 1)])
    return img, torch.zeros(text_len, 3)


def encode_text(m: Models, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(txt, vec) for each prompt, as FluxKontextPipeline computes them (no attention mask)."""
    clip_ids = m.tokenizer(prompts, padding="max_length", max_length=m.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    vec = m.text_encoder(clip_ids.to(m.device), output_hidden_states=False).pooler_output
    txt = m.text_encoder_2(t5_ids(m, prompts).to(m.device), output_hidden_states=False)[0]
    return txt.to(m.text_encoder_2.dtype), vec.to(m.text_encoder.dtype)


def t5_ids(m: Models, prompts: list[str]) -> torch.Tensor:
    """The T5 encoder's token ids for each prompt, padded to the model's sequence length."""
    return m.tokenizer_2(prompts, padding="max_length", max_length=m.max_sequence_length, truncation=True, return_tensors="pt").input_ids


def image_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images → (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2.0 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL, rounded like diffusers' image processor."""
    arr = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


def vae_autocast(m) -> torch.autocast:
    """Where the VAE computes: in bf16 autocast when the model computes in bf16 (its weights
    stay fp32, and autocast keeps its normalisations in fp32), else in the VAE's own dtype.

    The loader keeps the VAE in fp32 for the colours it decodes; in bf16 autocast a decode
    lands within a couple of levels of fp32's, far inside any autoencoder's own error, and
    runs several times faster on a CPU with bf16 units (docs/engine.md has the figures). `m`
    is any family's models with `dtype` and `device`."""
    return torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=m.dtype == torch.bfloat16)


def encode_images(m: Models, images: list[Image.Image]) -> torch.Tensor:
    """Context images → packed, normalised latent tokens (posterior mode, as the pipeline does)."""
    x = image_to_tensor(images).to(m.device, m.vae.dtype)
    with vae_autocast(m):
        # One image at a time: a convolution's kernel (so its rounding) can depend on the
        # batch, and a picture's latents must not depend on what else was encoded with it.
        z = torch.cat([m.vae.encode(x[i : i + 1]).latent_dist.mode().to(m.vae.dtype) for i in range(x.shape[0])])
    z = (z - m.vae.config.shift_factor) * m.vae.config.scaling_factor
    return pack(z)


def stack_images(rows: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Each row's images' latents (each (1, N, 4C)) side by side in the sequence: (B, kN, 4C).
    Rows of one batch share a sequence length, so every row must have k images."""
    k = len(rows[0])
    if any(len(r) != k for r in rows):
        raise ValueError(f"every row of a batch needs the same number of images; got {sorted({len(r) for r in rows})}")
    return torch.cat([torch.cat(r, dim=1) for r in rows])


def initial_noise(seed: int, latent_channels: int, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Packed noise (1, N, 4C) for one image, drawn as diffusers does from a CPU generator."""
    h, w = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    g = torch.Generator("cpu").manual_seed(seed)
    return pack(torch.randn((1, latent_channels, h, w), generator=g, dtype=torch.float32))


def flow_start_latents(start: FlowStart, img_cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x1, the latents at t = 1: `noise` itself, or the context latents plus σ·noise."""
    if start.kind == "noise":
        return noise
    return img_cond.to(noise.dtype) + start.noise * noise


def initial_latents(m: Models, seed: int, img_cond: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One sample's starting latents (1, N, 4C): the seed's noise, moved to the model's start."""
    noise = initial_noise(seed, m.latent_channels, height, width, m.vae_scale_factor)
    return flow_start_latents(m.flow_start, img_cond.float(), noise).to(m.dtype)


# Consensus: an output made of several denoisings of the same edit, each from its own
# noise. A small model's mistakes (a speck, a streak, a patch of the old colour) land in a
# different place in each draw while the change the instruction asks for is in every one,
# so the per-element median of the draws keeps the change and drops what one draw alone
# made. Draw j of the output with seed s uses seed s + j·DRAW_STRIDE: draw 0 is the output's
# single-draw noise, and every draw is a sample stock diffusers gives for its seed.
DRAW_STRIDE = 1_000_003


def draw_seeds(seed: int, consensus: int) -> list[int]:
    """The seeds of one output's `consensus` draws."""
    return [seed + j * DRAW_STRIDE for j in range(consensus)]


def merge_draws(latents: torch.Tensor, draws: int) -> torch.Tensor:
    """(n·draws, N, 4C) → (n, N, 4C): each output the per-element median of its `draws`
    consecutive rows (the mean of the middle two when `draws` is even)."""
    if draws == 1:
        return latents
    n = latents.shape[0] // draws
    if n * draws != latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} rows are not whole groups of {draws} draws")
    ordered = latents.reshape(n, draws, *latents.shape[1:]).sort(dim=1).values
    return (ordered[:, (draws - 1) // 2] + ordered[:, draws // 2]) / 2


# ---------------------------------------------------------------- schedule


def shift_mu(seq_len: int, scheduler_config: dict) -> float:
    c = scheduler_config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return seq_len * m + (base - m * base_len)


@lru_cache(maxsize=64)
def _schedule_cached(num_steps: int, mu: float | None, config_items: tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(dict(config_items))
    sched.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return tuple(float(t) for t in sched.timesteps), tuple(float(s) for s in sched.sigmas)


def flow_schedule(num_steps: int, mu: float | None, scheduler_config: dict) -> tuple[list[float], list[float]]:
    """(timesteps, sigmas) of diffusers' flow-matching Euler scheduler from evenly spaced
    sigmas, shifted by `mu` where the config shifts dynamically; len(sigmas) = steps + 1."""
    items = tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in scheduler_config.items() if not k.startswith("_")))
    ts, ss = _schedule_cached(num_steps, mu, items)
    return list(ts), list(ss)


def schedule(num_steps: int, seq_len: int, scheduler_config: dict) -> tuple[list[float], list[float]]:
    """(timesteps, sigmas) exactly as FluxKontextPipeline would set them; len(sigmas) = steps + 1."""
    mu = shift_mu(seq_len, scheduler_config) if scheduler_config.get("use_dynamic_shifting") else None
    return flow_schedule(num_steps, mu, scheduler_config)


# ---------------------------------------------------------------- denoise


def predict_velocity(
    m: Models,
    *,
    img: torch.Tensor,
    img_cond: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    timesteps: torch.Tensor,
    guidance: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
) -> torch.Tensor:
    """One transformer pass over a batch. `timesteps` (B,) in the scheduler's 0–1000 scale."""
    x = torch.cat([img, img_cond], dim=1).to(m.dtype)
    guid = guidance.float() if m.transformer.config.guidance_embeds else None
    out = m.transformer(
        hidden_states=x,
        timestep=(timesteps.to(x.dtype) / 1000),
        guidance=guid,
        pooled_projections=vec.to(m.dtype),
        encoder_hidden_states=txt.to(m.dtype),
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    return out[:, : img.shape[1]]


def with_and_without(
    m: Models,
    *,
    img: torch.Tensor,
    img_cond: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    negative: tuple[torch.Tensor, torch.Tensor],
    timesteps: torch.Tensor,
    guidance: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(v(prompt), v(negative)) of every row, from one forward: each row's twin with the
    `negative` (txt, vec) (one row, or one per row) rides in the same batch."""
    b = img.shape[0]
    neg_txt, neg_vec = (t.expand(b, *t.shape[1:]) for t in negative)
    v = predict_velocity(m, img=img.repeat(2, 1, 1), img_cond=img_cond.repeat(2, 1, 1), txt=torch.cat([txt, neg_txt.to(txt.dtype)]),
                         vec=torch.cat([vec, neg_vec.to(vec.dtype)]), timesteps=timesteps.repeat(2), guidance=guidance.repeat(2),
                         img_ids=img_ids, txt_ids=txt_ids)
    return v[:b], v[b:]


def guided_velocity(
    m: Models,
    *,
    img: torch.Tensor,
    img_cond: torch.Tensor,
    txt: torch.Tensor,
    vec: torch.Tensor,
    negative: tuple[torch.Tensor, torch.Tensor] | None,
    timesteps: torch.Tensor,
    guidance: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    height: int,
    width: int,
    cfg_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`predict_velocity` with the model's true CFG (`m.true_cfg`): each row's twin without the
    instruction (`negative`: the empty prompt's (txt, vec)) rides in the same forward, and a row
    the gate finds global keeps its plain prediction. `cfg_rows` (B,) bool: the rows that take true
    CFG at all (None: every row); the others get their plain prediction, exactly."""
    cfg = m.true_cfg
    inputs = dict(img=img, img_cond=img_cond, txt=txt, vec=vec, timesteps=timesteps, guidance=guidance, img_ids=img_ids, txt_ids=txt_ids)
    if negative is None or not cfg.on or (cfg_rows is not None and not bool(cfg_rows.any())):
        return predict_velocity(m, **inputs)
    plain, empty = with_and_without(m, negative=negative, **inputs)
    cond, neg = plain.float(), empty.float()
    # FLUX's timesteps are its sigmas × 1000, so x0 = x_t − σ·v.
    x0 = img.float() - (timesteps.float() / 1000).view(-1, 1, 1) * cond
    moved = change_map(x0, img_cond[:, : img.shape[1]], height, width, m.vae_scale_factor).reshape(img.shape[0], -1)
    keep_plain = torch.from_numpy(np.median(moved, axis=1) > cfg.gate)
    if cfg_rows is not None:
        keep_plain = keep_plain | ~cfg_rows
    return torch.where(keep_plain.view(-1, 1, 1), plain, (neg + cfg.scale * (cond - neg)).to(plain.dtype))


def empty_text(m: Models) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's (txt, vec), true CFG's negative: encoded once per loaded model."""
    if m.negative is None:
        m.negative = encode_text(m, [""])
    return m.negative


def euler_step(img: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x ← x + (σ_next − σ)·v per row, in fp32 like diffusers' scheduler, returned in v's dtype."""
    dt = (sigma_next - sigma).view(-1, 1, 1)
    return (img.float() + dt * v.float()).to(v.dtype)


def change_map(img: torch.Tensor, img_cond: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> np.ndarray:
    """(B, h, w) per latent pixel: ‖output − context‖ / RMS(context), from packed latents
    img (B, N, 4C) and img_cond (1 or B, N, 4C) of an output of height × width pixels.
    Where the edit happened, as preserve.py reads it."""
    out = unpack(img.float(), height, width, vae_scale_factor)
    ctx = unpack(img_cond.float(), height, width, vae_scale_factor).expand_as(out)
    rms = ctx.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
    return ((out - ctx).pow(2).mean(dim=1, keepdim=True).sqrt() / rms)[:, 0].numpy()


# DiffEdit's estimate of where an edit happens (Couairon et al., 2022), the alternative to
# `change_map` the quality benchmark measures it against (`bench quality --regions`): the input noised to t, the velocity predicted
# with the instruction and without it, their difference per latent pixel averaged over a few
# noises. The model is trained to return its context when the instruction is empty, so the
# difference is where the instruction asks for change, whatever one denoising then drew.
CONTRAST_T = 0.5
CONTRAST_DRAWS = 4


@torch.no_grad()
def contrast_map(m: Models, image: Image.Image, prompt: str, *, seed: int, guidance: float = 3.5,
                 references: tuple[Image.Image, ...] = (), t: float = CONTRAST_T, draws: int = CONTRAST_DRAWS) -> np.ndarray:
    """(h, w) per latent pixel in [0, 1]: ‖v(instruction) − v(no instruction)‖ at x_t = (1 − t)·input
    + t·noise, averaged over `draws` noises and divided by its maximum; `image` is at the output
    size. 2·`draws` transformer rows in one batch."""
    width, height = image.size
    txt, vec = encode_text(m, [prompt])
    img_cond = encode_images(m, [image])
    context = torch.cat([img_cond, *(encode_images(m, [r]) for r in references)], dim=1)
    noise = torch.cat([initial_noise(s, m.latent_channels, height, width, m.vae_scale_factor) for s in draw_seeds(seed, draws)])
    x = ((1 - t) * img_cond.float() + t * noise).to(m.dtype)
    img_ids, txt_ids = kontext_ids(height, width, m.vae_scale_factor, txt.shape[1], 1 + len(references))
    with_prompt, without = with_and_without(
        m, img=x, img_cond=context.expand(draws, -1, -1), txt=txt.expand(draws, -1, -1), vec=vec.expand(draws, -1),
        negative=empty_text(m), timesteps=torch.full((draws,), 1000 * t), guidance=torch.full((draws,), float(guidance)),
        img_ids=img_ids, txt_ids=txt_ids,
    )
    diff = unpack(with_prompt.float() - without.float(), height, width, m.vae_scale_factor)
    contrast = diff.pow(2).mean(dim=1).sqrt().mean(dim=0)
    return (contrast / contrast.max().clamp_min(1e-6)).numpy()


def decode(m: Models, img: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    z = unpack(img, height, width, m.vae_scale_factor)
    z = z / m.vae.config.scaling_factor + m.vae.config.shift_factor
    z = z.to(m.vae.dtype)
    with vae_autocast(m):  # one image at a time, as in encode_images
        return [tensor_to_images(m.vae.decode(z[i : i + 1], return_dict=False)[0])[0] for i in range(z.shape[0])]


@torch.no_grad()
def denoise(
    m: Models,
    image: Image.Image,
    prompt: str,
    *,
    seeds: list[int],
    num_steps: int = 20,
    guidance: float = 3.5,
    on_step=None,
    references: tuple[Image.Image, ...] = (),
    consensus: int = 1,
    true_cfg: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output latents (n, N, 4C), context latents (1, N, 4C)) of one image edited by one
    prompt, one output per seed, in one batch; with `consensus` k, each output the median of
    its k draws (`draw_seeds`). `image` is already at the output size, and so is each of
    `references` (further context images, appended after it). For many requests at once, the
    engine calls the same functions. `true_cfg` False: the model's plain prediction even where
    it declares true CFG (EditRequest.true_cfg)."""
    width, height = image.size
    rows = [d for s in seeds for d in draw_seeds(s, consensus)]
    n = len(rows)
    txt, vec = encode_text(m, [prompt])
    img_cond = encode_images(m, [image])
    context = torch.cat([img_cond, *(encode_images(m, [r]) for r in references)], dim=1)
    img = torch.cat([initial_latents(m, s, img_cond, height, width) for s in rows])
    img_ids, txt_ids = kontext_ids(height, width, m.vae_scale_factor, txt.shape[1], 1 + len(references))
    timesteps, sigmas = schedule(num_steps, img.shape[1], m.scheduler_config)
    negative = empty_text(m) if m.true_cfg.on and true_cfg else None
    for i in range(num_steps):
        v = guided_velocity(
            m, img=img, img_cond=context.expand(n, -1, -1), txt=txt.expand(n, -1, -1), vec=vec.expand(n, -1), negative=negative,
            timesteps=torch.full((n,), timesteps[i]), guidance=torch.full((n,), float(guidance)),
            img_ids=img_ids, txt_ids=txt_ids, height=height, width=width,
        )
        img = euler_step(img, v, torch.full((n,), sigmas[i]), torch.full((n,), sigmas[i + 1]))
        if on_step is not None:
            on_step(i + 1, num_steps)
    return merge_draws(img, consensus), img_cond


@torch.no_grad()
def edit(m: Models, image: Image.Image, prompt: str, *, seeds: list[int], num_steps: int = 20, guidance: float = 3.5,
         on_step=None, references: tuple[Image.Image, ...] = (), consensus: int = 1) -> list[Image.Image]:
    """`denoise`, decoded: the model's raw outputs (preserve.py keeps the input's pixels)."""
    img, _ = denoise(m, image, prompt, seeds=seeds, num_steps=num_steps, guidance=guidance, on_step=on_step, references=references,
                     consensus=consensus)
    return decode(m, img, image.height, image.width)
