"""FLUX.2 [klein] (`Flux2KleinPipeline`): its sampler as plain functions, and its adapter.

What differs from Kontext:
- text: one Qwen3 causal LM; the prompt goes through the tokenizer's chat template, and the
  hidden states of a few layers (`text_encoder_out_layers`), concatenated per token, are
  the text sequence `txt` (1, L, K·H). No pooled vector.
- RoPE ids have four axes (T, row, column, L): the target is T = 0, reference image i
  (0-based) T = 10 + 10·i, text tokens (0, 0, 0, l). Several reference images are native:
  their tokens follow each other in the sequence, as `Flux2KleinPipeline(image=[a, b])` does.
- latents are normalised by the VAE's BatchNorm statistics over the packed channels
  (not a shift and scale), and the starting noise is drawn in the packed layout.
- the schedule's shift `mu` depends on the token count *and* the number of steps.
- guidance: the distilled models (`is_distilled` in model_index.json) take none; the base
  models run true classifier-free guidance against the empty prompt. Here the empty
  prompt's rows ride in the same forward pass as the conditional ones.
With one or more reference images the engine's output equals stock diffusers
`Flux2KleinPipeline`'s on the same directory (same seed, steps and guidance), when every
reference image is at the output's size (the service fits them so; the pipeline would keep
each at its own size).

**The KV variant** (`Flux2KleinKVPipeline`, e.g. FLUX.2 [klein] 9B KV) is the same transformer
(class and weights layout) with other attention: the reference tokens are modulated at a
fixed timestep 0 and attend only to each other, so their keys and values depend on the
reference images alone, not on the prompt, the target or the step. The stock pipeline
computes them in its first step and reuses them at every later one; here they are computed
once per request's set of images, before its first step (`reference_kv`), and every step runs
the target and text tokens only, attending to the cached keys and values (the transformer's
`kv_cache_mode="cached"`). It takes no guidance (the pipeline runs none).

Shapes: img (B, N, 4C) packed target latents (`sampler.pack`'s layout, which is Klein's
patchify-then-pack); reference (B, kN, 4C) for k images; txt (B, L, D); img_ids ((1 + k)N, 4);
txt_ids (L, 4).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from incontext import sampler
from incontext.engine.protocol import MAX_IMAGES
from incontext.errors import ModelError
from incontext.models.device import resolve_dtype
from incontext.models.loader import check_model_dir, load_part, offline

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
REFERENCE_T = 10  # the first reference image's T coordinate, and the step to the next, as the pipeline sets them


@dataclass
class KleinModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    transformer: torch.nn.Module
    scheduler_config: dict
    max_sequence_length: int = 512
    text_encoder_out_layers: tuple[int, ...] = (9, 18, 27)
    is_distilled: bool = True
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    negative_txt: torch.Tensor | None = None  # the empty prompt's states (1, L, D): true CFG's other half
    kv: bool = False  # Flux2KleinKVPipeline: the reference images' keys and values are computed once
    # The KV variant's reference keys and values by the identity of a request's image latents
    # (the runner's latent cache hands every request of the same images the same tensors):
    # a batch rebuilt when a request joins does not recompute its neighbours'.
    kv_cache: OrderedDict = field(default_factory=OrderedDict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4


def load(path: Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto", max_sequence_length: int | None = None) -> KleinModels:
    """A Flux2KleinPipeline directory. `dtype` as for Kontext (`loader.load_model`)."""
    offline()
    path = Path(path)
    index = check_model_dir(path, PARTS)
    dt = resolve_dtype(dtype, device)
    parts = {name: load_part(path, name, index) for name in ("tokenizer", "scheduler")}
    for name in ("transformer", "vae", "text_encoder"):
        module = load_part(path, name, index, torch_dtype=torch.float32 if name == "vae" else dt)
        parts[name] = module.to(device).eval().requires_grad_(False)
    extra_file = path / "incontext.json"
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    layers = tuple(extra.get("text_encoder_out_layers", (9, 18, 27)))
    hidden = parts["text_encoder"].config.hidden_size
    tr, vae = parts["transformer"], parts["vae"]
    if tr.config.joint_attention_dim != len(layers) * hidden:
        raise ModelError(f"transformer joint_attention_dim {tr.config.joint_attention_dim} is not {len(layers)} text layers × hidden size {hidden}")
    if tr.config.in_channels != vae.config.latent_channels * 4:
        raise ModelError(f"transformer in_channels {tr.config.in_channels} does not match the VAE's {vae.config.latent_channels} latent channels")
    kv = index.get("_class_name") == KLEIN_KV.pipeline_class
    if kv:
        # What Flux2KleinKVPipeline.__init__ does: the processors that split the reference
        # tokens' attention from the rest and read or write their keys and values.
        from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

        for block in tr.transformer_blocks:
            block.attn.set_processor(Flux2KVAttnProcessor())
        for block in tr.single_transformer_blocks:
            block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    m = KleinModels(
        tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=vae, transformer=tr,
        scheduler_config=dict(parts["scheduler"].config),
        max_sequence_length=max_sequence_length or extra.get("max_sequence_length", 512),
        # The KV pipeline runs no guidance whatever its config says (it registers no is_distilled).
        text_encoder_out_layers=layers, is_distilled=kv or bool(index.get("is_distilled", False)), dtype=dt,
        device=torch.device(device), kv=kv,
    )
    if not m.is_distilled:
        with torch.no_grad():
            m.negative_txt = encode_text(m, "")
    return m


# ---------------------------------------------------------------- prepare


def encode_text(m: KleinModels, prompt: str) -> torch.Tensor:
    """txt (1, L, K·H): the chosen layers' hidden states of the chat-formatted prompt."""
    text = m.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    tokens = m.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=m.max_sequence_length)
    out = m.text_encoder(input_ids=tokens.input_ids.to(m.device), attention_mask=tokens.attention_mask.to(m.device),
                         output_hidden_states=True, use_cache=False)
    states = torch.stack([out.hidden_states[k] for k in m.text_encoder_out_layers], dim=1)  # (1, K, L, H)
    _, k, length, hidden = states.shape
    return states.permute(0, 2, 1, 3).reshape(1, length, k * hidden).to(m.text_encoder.dtype)


def bn_stats(m: KleinModels) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's BatchNorm mean and std over the packed channels (4C,)."""
    bn = m.vae.bn
    return bn.running_mean, torch.sqrt(bn.running_var + m.vae.config.batch_norm_eps)


def encode_images(m: KleinModels, images: list[Image.Image]) -> torch.Tensor:
    """Reference images → packed, normalised latent tokens (B, N, 4C) (posterior mode)."""
    x = sampler.image_to_tensor(images).to(m.device, m.vae.dtype)
    with sampler.vae_autocast(m):
        tokens = sampler.pack(m.vae.encode(x).latent_dist.mode().to(m.vae.dtype))
    mean, std = bn_stats(m)
    return (tokens - mean.to(tokens.dtype)) / std.to(tokens.dtype)


def ids(height: int, width: int, vae_scale_factor: int, text_len: int, references: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids for target + `references` images ((1 + k)N, 4), txt_ids (L, 4)) for an output
    of height × width pixels, every reference image at that size."""
    ht, wt = height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)
    grid = torch.cartesian_prod(torch.arange(ht), torch.arange(wt))
    zeros = torch.zeros(ht * wt, 1, dtype=grid.dtype)
    target = torch.cat([zeros, grid, zeros], dim=1)
    images = [torch.cat([zeros + REFERENCE_T * (1 + i), grid, zeros], dim=1) for i in range(references)]
    txt_ids = torch.cat([torch.zeros(text_len, 3, dtype=grid.dtype), torch.arange(text_len)[:, None]], dim=1)
    return torch.cat([target, *images]), txt_ids


def initial_latents(m: KleinModels, seed: int, height: int, width: int) -> torch.Tensor:
    """One sample's noise (1, N, 4C), drawn as the pipeline does: in the packed channel
    layout (1, 4C, h, w) from a CPU generator, in the model's dtype."""
    h, w = height // (m.vae_scale_factor * 2), width // (m.vae_scale_factor * 2)
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, m.latent_channels * 4, h, w), generator=g, dtype=m.dtype)
    return noise.reshape(1, m.latent_channels * 4, h * w).permute(0, 2, 1).to(m.device)


def empirical_mu(seq_len: int, num_steps: int) -> float:
    """The schedule's shift: FLUX.2's fit over token count and step count (diffusers'
    `compute_empirical_mu`)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if seq_len > 4300:
        return float(a2 * seq_len + b2)
    m_200, m_10 = a2 * seq_len + b2, a1 * seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


# ---------------------------------------------------------------- denoise


@dataclass(frozen=True)
class KleinBatch:
    reference: torch.Tensor  # (B, kN, 4C): k images per row
    txt: torch.Tensor  # (B, L, D)
    guidance: torch.Tensor  # (B,) true-CFG scale; rows with cfg False ignore it
    cfg: torch.Tensor  # (B,) bool: the row also runs the empty prompt
    img_ids: torch.Tensor  # ((1 + k)N, 4)
    txt_ids: torch.Tensor  # (L, 4)

    def rows(self, index: torch.Tensor) -> "KleinBatch":
        return KleinBatch(self.reference.index_select(0, index), self.txt.index_select(0, index), self.guidance.index_select(0, index),
                          self.cfg.index_select(0, index), self.img_ids, self.txt_ids)


def predict_velocity(m: KleinModels, batch: KleinBatch, img: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """One transformer pass over a batch; rows with CFG add their empty-prompt twin to it."""
    b, n = img.shape[:2]
    x = torch.cat([img, batch.reference], dim=1).to(m.dtype)
    txt, t = batch.txt.to(m.dtype), timesteps.to(x.dtype)
    uncond = batch.cfg.nonzero().flatten()
    if len(uncond):
        x = torch.cat([x, x.index_select(0, uncond)])
        txt = torch.cat([txt, m.negative_txt.to(m.dtype).expand(len(uncond), -1, -1)])
        t = torch.cat([t, t.index_select(0, uncond)])
    out = m.transformer(hidden_states=x, encoder_hidden_states=txt, timestep=t / 1000, img_ids=batch.img_ids, txt_ids=batch.txt_ids,
                        guidance=None, return_dict=False)[0][:, :n]
    v = out[:b]
    if len(uncond):
        cond, neg = v.index_select(0, uncond), out[b:]
        scale = batch.guidance.index_select(0, uncond).to(v.dtype).view(-1, 1, 1)
        v = v.index_copy(0, uncond, neg + scale * (cond - neg))
    return v


KV_CACHE_SIZE = 64  # sets of reference images whose keys and values are kept (as the runner keeps latents)


@dataclass(frozen=True)
class KleinKVBatch:
    """The KV variant's batch: no reference tokens in the sequence, their keys and values instead."""

    txt: torch.Tensor  # (B, L, D)
    keys: tuple[torch.Tensor, ...]  # per block (double blocks, then single): (B, kN, heads, head_dim)
    values: tuple[torch.Tensor, ...]
    img_ids: torch.Tensor  # (N, 4): the target's only
    txt_ids: torch.Tensor  # (L, 4)

    def rows(self, index: torch.Tensor) -> "KleinKVBatch":
        return KleinKVBatch(self.txt.index_select(0, index), tuple(k.index_select(0, index) for k in self.keys),
                            tuple(v.index_select(0, index) for v in self.values), self.img_ids, self.txt_ids)


def reference_kv(m: KleinModels, references: tuple[torch.Tensor, ...], txt: torch.Tensor, ref_ids: torch.Tensor, txt_ids: torch.Tensor):
    """(keys, values) of one request's reference tokens at every block, each (1, kN, heads,
    head_dim): the transformer's "extract" pass over the reference tokens alone. They attend
    only to each other at a fixed timestep, so neither the prompt (`txt` only fills the text
    slots the pass expects) nor a target changes them."""
    key = tuple(id(r) for r in references)
    if key in m.kv_cache:
        m.kv_cache.move_to_end(key)
        return m.kv_cache[key][1]
    x = torch.cat(references, dim=1).to(m.dtype)
    _, cache = m.transformer(hidden_states=x, encoder_hidden_states=txt.to(m.dtype), timestep=torch.zeros(1, dtype=m.dtype), img_ids=ref_ids,
                             txt_ids=txt_ids, guidance=None, return_dict=False, kv_cache_mode="extract", num_ref_tokens=x.shape[1])
    layers = [*cache.double_block_caches, *cache.single_block_caches]
    kv = (tuple(c.k_ref for c in layers), tuple(c.v_ref for c in layers))
    m.kv_cache[key] = (references, kv)  # the tensors themselves, so their ids stay theirs while cached
    while len(m.kv_cache) > KV_CACHE_SIZE:
        m.kv_cache.popitem(last=False)
    return kv


def predict_velocity_kv(m: KleinModels, batch: KleinKVBatch, img: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """One transformer pass of the target and text tokens, attending to the cached reference keys and values."""
    from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

    tr = m.transformer
    cache = Flux2KVCache(len(tr.transformer_blocks), len(tr.single_transformer_blocks))
    cache.num_ref_tokens = batch.keys[0].shape[1]
    for layer, k, v in zip([*cache.double_block_caches, *cache.single_block_caches], batch.keys, batch.values):
        layer.store(k, v)
    x = img.to(m.dtype)
    return tr(hidden_states=x, encoder_hidden_states=batch.txt.to(m.dtype), timestep=timesteps.to(x.dtype) / 1000, img_ids=batch.img_ids,
              txt_ids=batch.txt_ids, guidance=None, return_dict=False, kv_cache=cache, kv_cache_mode="cached")[0]


def decode(m: KleinModels, img: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    mean, std = bn_stats(m)
    tokens = img * std.to(img.dtype) + mean.to(img.dtype)
    z = sampler.unpack(tokens, height, width, m.vae_scale_factor)
    with sampler.vae_autocast(m):
        return sampler.tensor_to_images(m.vae.decode(z.to(m.vae.dtype), return_dict=False)[0])


# ---------------------------------------------------------------- the adapter


class Klein:
    name = "klein"
    pipeline_class = "Flux2KleinPipeline"
    compiles = False  # served eagerly: engine/compiled.py packages Kontext's transformer only
    prompt_sees_images = False
    max_images = MAX_IMAGES

    def load(self, directory: Path, *, device: str, dtype, max_sequence_length: int | None) -> KleinModels:
        return load(directory, device=device, dtype=dtype, max_sequence_length=max_sequence_length)

    def encode_prompt(self, m: KleinModels, prompt: str, images: list[Image.Image]) -> torch.Tensor:
        return encode_text(m, prompt)

    def encode_images(self, m: KleinModels, images: list[Image.Image]) -> torch.Tensor:
        return encode_images(m, images)

    def schedule(self, m: KleinModels, num_steps: int, seq_len: int) -> tuple[list[float], list[float]]:
        return sampler.flow_schedule(num_steps, empirical_mu(seq_len, num_steps), m.scheduler_config)

    def initial_latents(self, m: KleinModels, seed: int, reference: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return initial_latents(m, seed, height, width)

    def batch(self, m: KleinModels, prompts: list[torch.Tensor], references: list[tuple[torch.Tensor, ...]], guidance: list[float],
              height: int, width: int, true_cfg: list[bool] | None = None) -> KleinBatch:
        txt = torch.cat(prompts)
        img_ids, txt_ids = ids(height, width, m.vae_scale_factor, txt.shape[1], len(references[0]))
        cfg = torch.tensor([g > 1 and not m.is_distilled for g in guidance])
        return KleinBatch(reference=sampler.stack_images(references), txt=txt, guidance=torch.tensor(guidance), cfg=cfg,
                          img_ids=img_ids.to(m.device), txt_ids=txt_ids.to(m.device))

    def velocity(self, m: KleinModels, batch: KleinBatch, img: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return predict_velocity(m, batch, img, timesteps)

    def decode(self, m: KleinModels, img: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        return decode(m, img, height, width)


class KleinKV(Klein):
    """`Flux2KleinKVPipeline` directories: Klein with the reference keys and values computed once."""

    name = "klein-kv"
    pipeline_class = "Flux2KleinKVPipeline"

    def batch(self, m: KleinModels, prompts: list[torch.Tensor], references: list[tuple[torch.Tensor, ...]], guidance: list[float],
              height: int, width: int, true_cfg: list[bool] | None = None) -> KleinKVBatch:
        txt = torch.cat(prompts)
        all_ids, txt_ids = ids(height, width, m.vae_scale_factor, txt.shape[1], len(references[0]))
        n = all_ids.shape[0] // (1 + len(references[0]))
        img_ids, ref_ids = all_ids[:n].to(m.device), all_ids[n:].to(m.device)
        txt_ids = txt_ids.to(m.device)
        per_row = [reference_kv(m, refs, prompt, ref_ids, txt_ids) for refs, prompt in zip(references, prompts)]
        keys = tuple(torch.cat(ks) for ks in zip(*(k for k, _ in per_row)))
        values = tuple(torch.cat(vs) for vs in zip(*(v for _, v in per_row)))
        return KleinKVBatch(txt=txt, keys=keys, values=values, img_ids=img_ids, txt_ids=txt_ids)

    def velocity(self, m: KleinModels, batch: KleinKVBatch, img: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return predict_velocity_kv(m, batch, img, timesteps)


KLEIN = Klein()
KLEIN_KV = KleinKV()
