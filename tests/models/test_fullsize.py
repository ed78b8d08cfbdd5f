"""The published models' shapes on the meta device: the single-file converter against FLUX.1
Kontext [dev]'s real layout, and the parameter counts docs/gpu.md's memory table rests on."""

from __future__ import annotations

from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from incontext.models import fullsize
from incontext.models.checkpoints import COMFY_PREFIX, flux_bfl_to_diffusers, flux_diffusers_to_bfl


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_kontext_single_file_converts_to_the_full_size_model_exactly():
    model = fullsize.on_meta(fullsize.kontext_transformer)
    want = shapes(model.state_dict())
    assert len([k for k in want if k.startswith("transformer_blocks.") and k.endswith("norm1.linear.weight")]) == 19
    assert len([k for k in want if k.startswith("single_transformer_blocks.") and k.endswith("norm.linear.weight")]) == 38
    bfl = flux_diffusers_to_bfl(model.state_dict())  # BFL's file layout, as flux1-kontext-dev.safetensors has it
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 4 * 3072, 3072)
    assert bfl["double_blocks.18.img_attn.qkv.weight"].shape == (3 * 3072, 3072) and "single_blocks.37.linear2.weight" in bfl
    assert shapes(flux_bfl_to_diffusers(dict(bfl), fullsize.KONTEXT_TRANSFORMER)) == want
    # diffusers' own converter (fixed at these widths) agrees on every key and shape.
    assert shapes(convert_flux_transformer_checkpoint_to_diffusers({COMFY_PREFIX + k: v for k, v in bfl.items()})) == want


def test_transformer_sizes_are_the_published_ones():
    # Published: FLUX.1 Kontext [dev] "12B", FLUX.2 [klein] "4B", Qwen-Image "20B".
    billions = {name: fullsize.size_of(fullsize.on_meta(build)).params / 1e9 for name, build in
                (("kontext", fullsize.kontext_transformer), ("klein", fullsize.klein_transformer), ("qwen", fullsize.qwen_edit_transformer))}
    assert 11.8 < billions["kontext"] < 12.0
    assert 3.7 < billions["klein"] < 4.1
    assert 20.2 < billions["qwen"] < 20.6


def test_fp8_weight_only_halves_the_linears_only():
    size = fullsize.size_of(fullsize.on_meta(fullsize.kontext_transformer))
    assert size.bf16 == 2 * size.params
    # Nearly every FLUX.1 weight is in a Linear: fp8 weight-only is a little over half of bf16.
    assert 0.5 * size.bf16 < size.fp8_weight_only < 0.51 * size.bf16
