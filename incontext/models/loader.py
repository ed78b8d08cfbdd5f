"""Load any FluxKontextPipeline-layout directory (our nano model or FLUX.1-Kontext-dev).
Other families' loaders (engine/families) reuse `check_model_dir` and `load_part`, so a
transformer given as one BFL, ComfyUI or GGUF file (models/checkpoints.py) serves every family.

Loading is offline only (local files); errors name the missing or mismatched part.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import torch

from incontext.errors import ModelError
from incontext.models import checkpoints
from incontext.models.device import resolve_dtype
from incontext.sampler import FlowStart, Models, TrueCfg

log = logging.getLogger(__name__)

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


def check_model_dir(path: Path, parts: tuple[str, ...] = PARTS) -> dict:
    """The parsed model_index.json, after checking every part is present. Raises ModelError."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelError(f"{path} is not a model directory: model_index.json is missing")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{index_file} is not valid JSON: {e}") from None
    missing = [p for p in parts if p not in index or not (path / p).is_dir()]
    if missing:
        raise ModelError(f"model directory {path} is missing: {', '.join(missing)}")
    return index


def load_part(path: Path, name: str, index: dict, **kwargs):
    """One part of a diffusers directory by the class model_index.json names for it."""
    library, class_name = index[name]

    module = importlib.import_module(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ModelError(f"{name}: class {library}.{class_name} does not exist in this installation")
    if library == "diffusers" and importlib.util.find_spec("accelerate") is None:
        # What diffusers falls back to without accelerate anyway, said so it does not warn.
        kwargs.setdefault("low_cpu_mem_usage", False)
    try:
        single_file = checkpoints.single_file_for(path, name) if name == "transformer" else None
        if single_file is not None:
            return checkpoints.load_transformer(single_file, config_dir=path / name, cls=cls, dtype=kwargs.get("torch_dtype", torch.float32))
        return cls.from_pretrained(path / name, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"{name} in {path} could not be loaded: {str(e).splitlines()[0]}") from None


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per text encoder on every load


def load_model(path: Path, *, device: str = "cpu", dtype: str | torch.dtype = "auto", max_sequence_length: int | None = None) -> Models:
    """Load a model directory. `dtype` is the compute dtype of the transformer and text encoders
    ("auto": bf16 where this machine has bf16 units, else fp32); the VAE stays in fp32 (it is
    small and bf16 convolutions are slower on CPUs)."""
    offline()
    path = Path(path)
    index = check_model_dir(path)
    dt = resolve_dtype(dtype, device)
    parts = {}
    for name in PARTS:
        if name.startswith("tokenizer") or name == "scheduler":
            parts[name] = load_part(path, name, index)
        else:
            module = load_part(path, name, index, torch_dtype=torch.float32 if name == "vae" else dt)
            parts[name] = module.to(device).eval().requires_grad_(False)
    tr, vae = parts["transformer"], parts["vae"]
    # Convolutions read channels-last weights faster on a CPU (docs/engine.md); the arithmetic
    # is the same.
    vae.to(memory_format=torch.channels_last)
    expected = vae.config.latent_channels * 4
    if tr.config.in_channels != expected:
        raise ModelError(f"transformer in_channels {tr.config.in_channels} does not match the VAE's {vae.config.latent_channels} latent channels (expected {expected})")
    if tr.config.joint_attention_dim != parts["text_encoder_2"].config.d_model:
        raise ModelError(f"transformer joint_attention_dim {tr.config.joint_attention_dim} does not match text_encoder_2 d_model {parts['text_encoder_2'].config.d_model}")
    if tr.config.pooled_projection_dim != parts["text_encoder"].config.hidden_size:
        raise ModelError(f"transformer pooled_projection_dim {tr.config.pooled_projection_dim} does not match text_encoder hidden size {parts['text_encoder'].config.hidden_size}")
    extra_file = path / "incontext.json"
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    if max_sequence_length is None:
        max_sequence_length = extra.get("max_sequence_length", 512)
    try:
        flow_start = FlowStart(extra.get("flow_start", "noise"), float(extra.get("start_noise", 1.0)))
        true_cfg = TrueCfg(float(extra.get("true_cfg_scale", 1.0)), float(extra.get("true_cfg_gate", math.inf)))
    except (TypeError, ValueError) as e:
        raise ModelError(f"{extra_file}: {e}") from None
    from incontext import selector

    log.info("loaded model %s (%s, %s)", path, device, dt)
    return Models(
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"], vae=vae, transformer=tr, scheduler_config=dict(parts["scheduler"].config),
        max_sequence_length=max_sequence_length, dtype=dt, device=torch.device(device), flow_start=flow_start,
        true_cfg=true_cfg, selector=selector.load(path),
    )
