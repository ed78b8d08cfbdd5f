"""Qwen-Image-Edit (`QwenImageEditPlusPipeline`, and `QwenImageEditPipeline`): its sampler as
plain functions, and its adapter.

What differs from the FLUX families:
- text: Qwen2.5-VL reads the prompt *and the images* ("Picture 1: <image> … instruction"
  in the pipeline's chat template); the last layer's states, less the template's first 64
  tokens, are `txt` (1, L, D). So a request's text conditioning depends on its images:
  `prompt_sees_images` makes the runner key its text cache by them too. The Plus pipeline
  shows the VL encoder each image at about 384² pixels; the original pipeline shows it the
  one image at the VAE's size (here the output's).
- guidance: true classifier-free guidance against a negative prompt (" " unless the
  directory's incontext.json sets `negative_prompt`), encoded with the same images, then
  rescaled to the conditional prediction's norm per token. The request's `guidance_scale`
  is the pipeline's `true_cfg_scale`; above 1 the row's negative twin rides in the same
  forward as the batch (as Klein's base models do).
- the VAE is a video VAE: latents (B, C, 1, h, w) with one frame, normalised per channel by
  the config's `latents_mean` / `latents_std`; packed 2×2 like FLUX (`sampler.pack`).
- RoPE comes from `img_shapes`: the target and each reference image is a (1, h, w) grid,
  image i (the target is 0) at frame index i, text after the largest grid.
- text lengths differ per prompt: a batch pads them with a mask.

The VL processor: transformers 5's `Qwen2VLProcessor` will not even be built without its
video processor, which needs torchvision (not importable beside the project's CPU torch).
So this adapter loads the processor folder's two stock parts, the tokenizer and the
(PIL) image processor, and does the processor's one other job itself: each image
placeholder becomes as many placeholder tokens as the image has merged patches
(`vl_inputs`; tests/engine/test_qwen.py checks it against the stock processor).

Reference images: the engine encodes every image at the output's size (the service fits
them so). Stock pipelines resize each to about 1024² pixels first (`VAE_IMAGE_SIZE`), so
the output equals the pipeline's for outputs of about 1024² (the model's own size), and
differs at others, where the pipeline's reference tokens would outnumber the target's.

Shapes: img (B, N, 4C) packed target latents; reference (B, kN, 4C) for k images; txt
(B, L, D) with txt_mask (B, L).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from incontext import sampler
from incontext.engine.protocol import MAX_IMAGES
from incontext.errors import ModelError
from incontext.models.device import resolve_dtype
from incontext.models.loader import check_model_dir, load_part, offline

PARTS = ("transformer", "vae", "text_encoder", "processor", "scheduler")
NEGATIVE_PROMPT = " "  # the model card's: true CFG needs a negative prompt, and the pipeline takes it as given
SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then "
          "explain how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
          "requirements while maintaining consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATE_TOKENS = 64  # the system prompt's length in Qwen's tokenizer: the pipelines drop that many states
CONDITION_AREA = 384 * 384  # the Plus pipeline's image size for the VL encoder


@dataclass
class QwenModels:
    tokenizer: object
    image_processor: object  # Qwen2-VL's, PIL backend
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    transformer: torch.nn.Module
    scheduler_config: dict
    plus: bool = True  # QwenImageEditPlusPipeline (several images, "Picture i:" labels)
    negative_prompt: str = NEGATIVE_PROMPT
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim


def load(path: Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto", plus: bool = True) -> QwenModels:
    """A Qwen-Image-Edit(-Plus) directory. `dtype` as for Kontext (`loader.load_model`); the VAE stays fp32."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    offline()
    path = Path(path)
    index = check_model_dir(path, PARTS)
    dt = resolve_dtype(dtype, device)
    parts = {"scheduler": load_part(path, "scheduler", index)}
    for name in ("transformer", "vae", "text_encoder"):
        module = load_part(path, name, index, torch_dtype=torch.float32 if name == "vae" else dt)
        parts[name] = module.to(device).eval().requires_grad_(False)
    # The processor's own tokenizer and image processor (the pipeline encodes through the
    # processor, not the `tokenizer` part); the PIL backend, as torchvision is not here.
    try:
        tokenizer = AutoTokenizer.from_pretrained(path / "processor", local_files_only=True)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path / "processor", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"processor in {path} could not be loaded: {str(e).splitlines()[0]}") from None
    tr, vae, te = parts["transformer"], parts["vae"], parts["text_encoder"]
    if tr.config.guidance_embeds:
        raise ModelError("a Qwen-Image transformer with a guidance embedding is not supported (true CFG only)")
    if tr.config.in_channels != vae.config.z_dim * 4:
        raise ModelError(f"transformer in_channels {tr.config.in_channels} does not match the VAE's {vae.config.z_dim} latent channels")
    if tr.config.joint_attention_dim != te.config.text_config.hidden_size:
        raise ModelError(f"transformer joint_attention_dim {tr.config.joint_attention_dim} is not the text encoder's hidden size")
    extra_file = path / "incontext.json"
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    return QwenModels(tokenizer=tokenizer, image_processor=image_processor, text_encoder=te, vae=vae, transformer=tr,
                      scheduler_config=dict(parts["scheduler"].config), plus=plus,
                      negative_prompt=extra.get("negative_prompt", NEGATIVE_PROMPT), dtype=dt, device=torch.device(device))


# ---------------------------------------------------------------- prepare


def fit_area(area: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) of about `area` pixels at width:height, multiples of 32 (the pipelines' `calculate_dimensions`)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    return round(w / 32) * 32, round(w / ratio / 32) * 32


def vl_text(m: QwenModels, prompt: str, count: int) -> str:
    if m.plus:
        return SYSTEM + "".join(f"Picture {i + 1}: {IMAGE}" for i in range(count)) + prompt + "<|im_end|>\n<|im_start|>assistant\n"
    return SYSTEM + IMAGE + prompt + "<|im_end|>\n<|im_start|>assistant\n"


def vl_inputs(m: QwenModels, prompt: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """What `Qwen2VLProcessor(text=…, images=…)` gives the VL encoder: input_ids and
    attention_mask (1, T), pixel_values (patches, P), image_grid_thw (k, 3)."""
    if m.plus:
        images = [im.resize(fit_area(CONDITION_AREA, *im.size), Image.Resampling.LANCZOS) for im in images]
    elif len(images) != 1:
        raise ModelError("QwenImageEditPipeline takes one image; use a QwenImageEditPlusPipeline directory for several")
    vision = m.image_processor(images=images, return_tensors="pt")
    pad, merged = "<|image_pad|>", m.image_processor.merge_size ** 2
    text = vl_text(m, prompt, len(images))
    # Each placeholder, in order, becomes one token per merged patch of its image; a marker
    # keeps the expanded ones from being expanded again.
    for grid in vision["image_grid_thw"]:
        text = text.replace(pad, "<|placeholder|>" * (int(grid.prod()) // merged), 1)
    tokens = m.tokenizer(text.replace("<|placeholder|>", pad), return_tensors="pt")
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask, **vision}


def encode_text(m: QwenModels, prompt: str, images: list[Image.Image]) -> torch.Tensor:
    """txt (1, L, D): the VL encoder's last states for the prompt beside its images, less the template's start."""
    inputs = {k: v.to(m.device) for k, v in vl_inputs(m, prompt, images).items()}
    out = m.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"].to(m.text_encoder.dtype), image_grid_thw=inputs["image_grid_thw"],
                         output_hidden_states=True)
    states = out.hidden_states[-1][inputs["attention_mask"].bool()]  # (T, D): one prompt, no padding
    return states[TEMPLATE_TOKENS:][None].to(m.text_encoder.dtype)


@dataclass(frozen=True)
class QwenPrompt:
    txt: torch.Tensor  # (1, L, D)
    negative: torch.Tensor  # (1, L', D): the negative prompt beside the same images


def latent_stats(m: QwenModels) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std, over the packed channels (4C,) (each channel's 2×2 patch)."""
    mean = torch.tensor(m.vae.config.latents_mean).repeat_interleave(4)
    std = torch.tensor(m.vae.config.latents_std).repeat_interleave(4)
    return mean.to(m.device), std.to(m.device)


def encode_images(m: QwenModels, images: list[Image.Image]) -> torch.Tensor:
    """Reference images → packed, normalised latent tokens (B, N, 4C) (posterior mode, one frame)."""
    x = sampler.image_to_tensor(images).to(m.device, m.vae.dtype)[:, :, None]
    with sampler.vae_autocast(m):
        tokens = sampler.pack(m.vae.encode(x).latent_dist.mode()[:, :, 0].to(m.vae.dtype))
    mean, std = latent_stats(m)
    return (tokens - mean.to(tokens.dtype)) / std.to(tokens.dtype)


def initial_latents(m: QwenModels, seed: int, height: int, width: int) -> torch.Tensor:
    """One sample's noise (1, N, 4C), drawn as the pipeline does: (1, 1, C, h, w) from a CPU generator, in the model's dtype."""
    h, w = 2 * (height // (m.vae_scale_factor * 2)), 2 * (width // (m.vae_scale_factor * 2))
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 1, m.latent_channels, h, w), generator=g, dtype=m.dtype)
    return sampler.pack(noise[:, 0]).to(m.device)


# ---------------------------------------------------------------- denoise


def pad_text(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts (1, L_i, D) → (B, L, D) zero-padded at the end, and the mask (B, L) of real tokens."""
    length = max(s.shape[1] for s in states)
    txt = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, length - s.shape[1])) for s in states])
    mask = torch.stack([torch.arange(length) < s.shape[1] for s in states]).to(txt.device)
    return txt, mask


@dataclass(frozen=True)
class QwenBatch:
    reference: torch.Tensor  # (B, kN, 4C): k images per row
    txt: torch.Tensor  # (B, L, D), padded
    negative: torch.Tensor  # (B, L, D), padded to the same L
    txt_mask: torch.Tensor  # (B, L) bool
    negative_mask: torch.Tensor  # (B, L) bool
    guidance: torch.Tensor  # (B,) true-CFG scale; rows with cfg False ignore it
    cfg: torch.Tensor  # (B,) bool: the row also runs its negative prompt
    img_shapes: tuple[tuple[int, int, int], ...]  # (frames, h, w) in tokens: the target, then each image

    def rows(self, index: torch.Tensor) -> "QwenBatch":
        pick = lambda t: t.index_select(0, index.to(t.device))  # noqa: E731
        return QwenBatch(pick(self.reference), pick(self.txt), pick(self.negative), pick(self.txt_mask), pick(self.negative_mask),
                         self.guidance.index_select(0, index), self.cfg.index_select(0, index), self.img_shapes)


def make_batch(m: QwenModels, prompts: list[QwenPrompt], references: list[tuple[torch.Tensor, ...]], guidance: list[float],
               height: int, width: int) -> QwenBatch:
    txt, mask = pad_text([p.txt for p in prompts] + [p.negative for p in prompts])
    b = len(prompts)
    grid = (1, height // (m.vae_scale_factor * 2), width // (m.vae_scale_factor * 2))
    return QwenBatch(reference=sampler.stack_images(references), txt=txt[:b], negative=txt[b:], txt_mask=mask[:b], negative_mask=mask[b:],
                     guidance=torch.tensor(guidance), cfg=torch.tensor([g > 1 for g in guidance]),
                     img_shapes=(grid,) * (1 + len(references[0])))


def predict_velocity(m: QwenModels, batch: QwenBatch, img: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """One transformer pass over a batch; rows with CFG add their negative twin to it."""
    b, n = img.shape[:2]
    x = torch.cat([img, batch.reference], dim=1).to(m.dtype)
    txt, mask, t = batch.txt, batch.txt_mask, timesteps.to(x.dtype)
    uncond = batch.cfg.nonzero().flatten()
    if len(uncond):
        x = torch.cat([x, x.index_select(0, uncond.to(x.device))])
        txt = torch.cat([txt, batch.negative.index_select(0, uncond.to(txt.device))])
        mask = torch.cat([mask, batch.negative_mask.index_select(0, uncond.to(mask.device))])
        t = torch.cat([t, t.index_select(0, uncond)])
    # Trailing text columns no row uses are dropped; with no padding left, no mask (as the pipeline runs one prompt).
    txt, mask = txt[:, : int(mask.sum(1).max())], mask[:, : int(mask.sum(1).max())]
    out = m.transformer(hidden_states=x, encoder_hidden_states=txt.to(m.dtype), encoder_hidden_states_mask=None if mask.all() else mask,
                        timestep=t.to(x.device) / 1000, img_shapes=[list(batch.img_shapes)] * len(x), guidance=None,
                        return_dict=False)[0][:, :n]
    v = out[:b]
    if len(uncond):
        cond, neg = v.index_select(0, uncond.to(v.device)), out[b:]
        scale = batch.guidance.index_select(0, uncond).to(v.dtype).to(v.device).view(-1, 1, 1)
        guided = neg + scale * (cond - neg)
        # The pipeline keeps each token's velocity at the conditional prediction's norm.
        guided = guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        v = v.index_copy(0, uncond.to(v.device), guided)
    return v


def decode(m: QwenModels, img: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    mean, std = latent_stats(m)
    tokens = img * std.to(img.dtype) + mean.to(img.dtype)
    z = sampler.unpack(tokens, height, width, m.vae_scale_factor)[:, :, None]
    with sampler.vae_autocast(m):
        return sampler.tensor_to_images(m.vae.decode(z.to(m.vae.dtype), return_dict=False)[0][:, :, 0])


# ---------------------------------------------------------------- the adapter


class Qwen:
    name = "qwen"
    compiles = False  # served eagerly: engine/compiled.py packages Kontext's transformer only
    prompt_sees_images = True  # the VL encoder reads the images with the prompt

    def __init__(self, pipeline_class: str, plus: bool):
        self.pipeline_class, self.plus = pipeline_class, plus
        self.max_images = MAX_IMAGES if plus else 1  # the original pipeline's template has one image

    def load(self, directory: Path, *, device: str, dtype, max_sequence_length: int | None) -> QwenModels:
        return load(directory, device=device, dtype=dtype, plus=self.plus)

    def encode_prompt(self, m: QwenModels, prompt: str, images: list[Image.Image]) -> QwenPrompt:
        # The negative is encoded with every prompt (one more VL pass per prompt and images),
        # so the cached conditioning serves a request with or without guidance.
        return QwenPrompt(encode_text(m, prompt, images), encode_text(m, m.negative_prompt, images))

    def encode_images(self, m: QwenModels, images: list[Image.Image]) -> torch.Tensor:
        return encode_images(m, images)

    def schedule(self, m: QwenModels, num_steps: int, seq_len: int) -> tuple[list[float], list[float]]:
        return sampler.schedule(num_steps, seq_len, m.scheduler_config)

    def initial_latents(self, m: QwenModels, seed: int, reference: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return initial_latents(m, seed, height, width)

    def batch(self, m: QwenModels, prompts: list[QwenPrompt], references: list[tuple[torch.Tensor, ...]], guidance: list[float],
              height: int, width: int, true_cfg: list[bool] | None = None) -> QwenBatch:
        return make_batch(m, prompts, references, guidance, height, width)

    def velocity(self, m: QwenModels, batch: QwenBatch, img: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return predict_velocity(m, batch, img, timesteps)

    def decode(self, m: QwenModels, img: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        return decode(m, img, height, width)


QWEN_EDIT_PLUS = Qwen("QwenImageEditPlusPipeline", plus=True)
QWEN_EDIT = Qwen("QwenImageEditPipeline", plus=False)
