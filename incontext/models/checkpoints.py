"""Single-file transformer checkpoints: what BFL, ComfyUI and the GGUF quantisers publish.

A model directory serves one when its `transformer/` folder holds the diffusers
`config.json` beside one such file, or when its `incontext.json` names the file:

    {"checkpoints": {"transformer": "/models/flux1-kontext-dev.safetensors"}}

(a relative path is relative to the model directory). Formats read:

- BFL's own layout (`double_blocks.0.img_attn.qkv.weight`, …), with or without ComfyUI's
  `model.diffusion_model.` prefix: converted to diffusers' names by diffusers' mapping
  (`flux_bfl_to_diffusers` for FLUX.1, diffusers' own function for FLUX.2);
- ComfyUI's "scaled fp8" files (float8_e4m3fn weights, each with a `scale_weight`):
  dequantised to the compute dtype as they are read, so the model runs as a bf16 one;
- GGUF (`.gguf`, needs the `gguf` extra): kept quantised, through diffusers'
  GGUFQuantizationConfig, dequantised per layer at compute time;
- files already in diffusers' names (ComfyUI's Qwen-Image files, after the prefix).

Loading checks the converted keys and shapes against the model the config describes, and
names what is missing or unexpected.

    from incontext.models.checkpoints import load_transformer
    tr = load_transformer(Path("flux1-kontext-dev.safetensors"), config_dir=Path("kontext/transformer"),
                          cls=FluxTransformer2DModel, dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from incontext.errors import ModelError

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
SUFFIXES = (".safetensors", ".gguf")
# diffusers' own weight files; anything else with a weights suffix in a part folder is a single file.
DIFFUSERS_NAMES = ("diffusion_pytorch_model", "model")


def single_file_for(model_dir: Path, part: str) -> Path | None:
    """The single-file checkpoint serving `part` of a model directory, if any."""
    model_dir = Path(model_dir)
    extra_file = model_dir / "incontext.json"
    if extra_file.is_file():
        named = json.loads(extra_file.read_text()).get("checkpoints", {}).get(part)
        if named:
            file = (model_dir / named).expanduser()
            if not file.is_file():
                raise ModelError(f"{extra_file} names {named} for {part}, which is not a file")
            return file
    part_dir = model_dir / part
    if not part_dir.is_dir():
        return None
    found = sorted(f for f in part_dir.iterdir() if f.suffix in SUFFIXES and not f.name.startswith(DIFFUSERS_NAMES))
    if len(found) > 1:
        raise ModelError(f"{part_dir} holds several checkpoints ({', '.join(f.name for f in found)}); keep one, or name it in incontext.json")
    return found[0] if found else None


# ------------------------------------------------------------------ reading


def read_state_dict(file: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, ComfyUI's prefix removed; scaled fp8 weights dequantised to `dtype`,
    GGUF tensors kept quantised (diffusers' GGUFParameter)."""
    file = Path(file)
    if file.suffix == ".gguf":
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        state = load_gguf_checkpoint(str(file))
    else:
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
            raise ModelError(f"{file} is not a readable safetensors file: {e}") from None
    state = {k.removeprefix(COMFY_PREFIX): v for k, v in state.items()}
    if any(k.endswith(".scale_weight") for k in state):
        state = dequantize_scaled_fp8(state, dtype)
    return state


def dequantize_scaled_fp8(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8: `w.weight` (float8) times `w.scale_weight` (a float32 scale per tensor)
    is the weight. `scale_input` (an activation scale for fp8 matmuls) and the `scaled_fp8` marker
    are dropped: the weights are served at `dtype`, where inputs need no scale."""
    out = {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        scale_key = key.removesuffix(".weight") + ".scale_weight"
        if key.endswith(".weight") and scale_key in state:
            value = (value.to(torch.float32) * state[scale_key].to(torch.float32)).to(dtype)
        elif value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            value = value.to(dtype)  # fp8 without a scale: scale 1
        out[key] = value
    return out


# ------------------------------------------------------------------ FLUX.1: BFL ↔ diffusers names

# One-to-one renames (BFL → diffusers) outside the blocks.
_FLUX_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
_FLUX_SINGLE = {
    "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2": "proj_out",
}
# Fused projections: BFL's tensor is the concatenation (dim 0) of these diffusers tensors.
_FLUX_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_FLUX_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _renamed(name: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def flux_bfl_to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL's FLUX.1 names → FluxTransformer2DModel's. The same mapping as diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers`, whose widths are fixed at FLUX.1's
    (3072 hidden); here they come from `config`, so small test models convert too
    (tests/models/test_checkpoints.py holds the two equal at FLUX.1's widths)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    single_split = (inner, inner, inner, 4 * inner)  # q, k, v and the MLP input (mlp_ratio 4)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in state.items():
        if name.startswith(_FLUX_FINAL_MOD[0] + "."):
            out[_FLUX_FINAL_MOD[1] + name[len(_FLUX_FINAL_MOD[0]):]] = _swap_halves(value)
            continue
        if name.startswith(("double_blocks.", "single_blocks.")):
            kind, index, rest = name.split(".", 2)
            double = kind == "double_blocks"
            prefix = f"{'transformer_blocks' if double else 'single_transformer_blocks'}.{index}."
            fused = _FLUX_DOUBLE_FUSED if double else _FLUX_SINGLE_FUSED
            stem, _, leaf = rest.rpartition(".")
            if stem in fused:
                sizes = (value.shape[0] // 3,) * 3 if double else single_split
                for target, piece in zip(fused[stem], torch.split(value, sizes, dim=0)):
                    out[f"{prefix}{target}.{leaf}"] = piece
                continue
            target = _renamed(rest, _FLUX_DOUBLE if double else _FLUX_SINGLE)
            if target is not None:
                out[prefix + target] = value
                continue
        else:
            target = _renamed(name, _FLUX_TOP)
            if target is not None:
                out[target] = value
                continue
        unknown.append(name)
    if unknown:
        raise ModelError(f"not a FLUX.1 checkpoint in BFL's layout: unknown keys {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")
    return out


def flux_diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel's names → BFL's (the inverse of `flux_bfl_to_diffusers`): the layout
    BFL's reference code and ComfyUI read. Works on meta tensors (tests/models/test_fullsize.py)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    blocks = {(k.split(".")[0], int(k.split(".")[1])) for k in state if k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    for kind, index in sorted(blocks):
        double = kind == "transformer_blocks"
        src, dst = f"{kind}.{index}.", f"{'double_blocks' if double else 'single_blocks'}.{index}."
        for stem, parts in (_FLUX_DOUBLE_FUSED if double else _FLUX_SINGLE_FUSED).items():
            for leaf in ("weight", "bias"):
                keys = [f"{src}{p}.{leaf}" for p in parts]
                out[f"{dst}{stem}.{leaf}"] = torch.cat([state[k] for k in keys], dim=0)
                used.update(keys)
    inverse_blocks = [({v: k for k, v in _FLUX_DOUBLE.items()}, "transformer_blocks.", "double_blocks."),
                      ({v: k for k, v in _FLUX_SINGLE.items()}, "single_transformer_blocks.", "single_blocks.")]
    inverse_top = {v: k for k, v in _FLUX_TOP.items()}
    for name, value in state.items():
        if name in used:
            continue
        if name.startswith(_FLUX_FINAL_MOD[1] + "."):
            out[_FLUX_FINAL_MOD[0] + name[len(_FLUX_FINAL_MOD[1]):]] = _swap_halves(value)
            continue
        for table, src, dst in inverse_blocks:
            if name.startswith(src):
                index, rest = name[len(src):].split(".", 1)
                out[f"{dst}{index}.{_renamed(rest, table)}"] = value
                break
        else:
            out[_renamed(name, inverse_top)] = value
    return out


# ------------------------------------------------------------------ loading


def to_diffusers(class_name: str, state: dict[str, torch.Tensor], config: dict, expected: set[str]) -> dict[str, torch.Tensor]:
    """A checkpoint in whatever layout → the model's own names (`expected`: its state_dict's keys)."""
    if set(state) == expected:
        return state
    if class_name == "FluxTransformer2DModel" and any(k.startswith("double_blocks.") for k in state):
        return flux_bfl_to_diffusers(state, config)
    if class_name == "Flux2Transformer2DModel" and any(k.startswith("double_blocks.") for k in state):
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        return convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
    return state  # names the check below reports against the model's


def check_keys(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], file: Path) -> None:
    """Missing, unexpected and mis-shaped tensors, named (GGUF tensors' shapes are their packed bytes, not checked)."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    shapes = [f"{k} {tuple(state[k].shape)} ≠ {tuple(model_state[k].shape)}" for k in sorted(set(state) & set(model_state))
              if not isinstance(state[k], GGUFParameter) and state[k].shape != model_state[k].shape]
    problems = [f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
    if problems:
        raise ModelError(f"{file} does not fit its config: {'; '.join(problems)}")


def load_transformer(file: Path, *, config_dir: Path, cls, dtype: torch.dtype):
    """A transformer from a single-file checkpoint and the diffusers config in `config_dir`."""
    file = Path(file)
    config = cls.load_config(str(config_dir), local_files_only=True)
    with torch.device("meta"):  # the model's names and shapes, allocating nothing
        model_state = cls.from_config(config).state_dict()
    state = to_diffusers(cls.__name__, read_state_dict(file, dtype), config, set(model_state))
    check_keys(state, model_state, file)
    kwargs: dict = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    if file.suffix == ".gguf":
        from diffusers import GGUFQuantizationConfig

        kwargs.update(quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), low_cpu_mem_usage=True)
    # diffusers builds the model (empty, where accelerate is installed), loads the converted
    # tensors and, for GGUF, swaps its linears for ones that dequantise at compute time.
    model = cls.from_single_file(state, **kwargs)
    log.info("loaded %s from %s (%d tensors)", cls.__name__, file, len(state))
    return model
