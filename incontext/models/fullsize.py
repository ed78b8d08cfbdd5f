"""The published models' sizes, from their public config.json files, without their weights.

Each config below is copied from the model's Hugging Face repository (the file named beside
it); nothing here downloads. Built on the meta device the modules allocate nothing, so the
parameter counts, the resident bytes per dtype (docs/gpu.md's memory table) and the
single-file converter's output (tests/models/test_fullsize.py) are checked against the real
shapes in a second on a CPU.

    python -m incontext.models.fullsize          # the memory table, as markdown
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# black-forest-labs/FLUX.1-Kontext-dev, transformer/config.json (the 12B FLUX.1 shape: 19 double +
# 38 single blocks, 24 heads × 128 = 3072 hidden; T5-XXL states in, CLIP-L pooled vector).
KONTEXT_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                           axes_dims_rope=(16, 56, 56))
# black-forest-labs/FLUX.1-Kontext-dev, vae/config.json (FLUX.1's 16-channel autoencoder).
FLUX1_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
# text_encoder/config.json: CLIP ViT-L/14's text tower.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
# text_encoder_2/config.json: T5 v1.1 XXL's encoder.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, is_encoder_decoder=False)

# black-forest-labs/FLUX.2-klein-4B, transformer/config.json (5 double + 20 single blocks, 3072
# hidden, MLP ratio 3; Qwen3-4B's layers 9, 18, 27 stacked: 3 × 2560 = 7680 text width).
KLEIN_4B_TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                            joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                            rope_theta=2000, eps=1e-6, guidance_embeds=False)
# vae/config.json: FLUX.2's 32-channel autoencoder (AutoencoderKLFlux2's defaults are its values).
FLUX2_VAE: dict = {}
# text_encoder/config.json: Qwen/Qwen3-4B (tied embeddings).
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True)

# Qwen/Qwen-Image-Edit-2509, transformer/config.json (60 MMDiT blocks, 3072 hidden; the 20B model).
QWEN_EDIT_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
                             joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# vae/config.json: Qwen-Image's one-frame video VAE (AutoencoderKLQwenImage's defaults are its values).
QWEN_VAE: dict = {}
# text_encoder/config.json: Qwen/Qwen2.5-VL-7B-Instruct, language model and vision tower.
QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, max_position_embeddings=128000, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, window_size=112, out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
    tie_word_embeddings=False,
)


def kontext_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**KONTEXT_TRANSFORMER)


def klein_transformer():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(**KLEIN_4B_TRANSFORMER)


def qwen_edit_transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(**QWEN_EDIT_TRANSFORMER)


def _flux1_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**FLUX1_VAE)


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(**FLUX2_VAE)


def _qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(**QWEN_VAE)


def _clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**CLIP_L))


def _t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**T5_XXL))


def _qwen3_4b():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))


def _qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B))


# family → its parts, (role, builder); the transformer first.
FAMILIES = {
    "FLUX.1 Kontext [dev]": [("transformer", kontext_transformer), ("text_encoder (CLIP-L)", _clip_l),
                             ("text_encoder_2 (T5-XXL encoder)", _t5_xxl), ("vae", _flux1_vae)],
    "FLUX.2 [klein] 4B": [("transformer", klein_transformer), ("text_encoder (Qwen3-4B)", _qwen3_4b), ("vae", _flux2_vae)],
    "Qwen-Image-Edit(-2509)": [("transformer", qwen_edit_transformer), ("text_encoder (Qwen2.5-VL-7B)", _qwen25_vl_7b), ("vae", _qwen_vae)],
}


def on_meta(builder):
    """The module with every parameter on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return builder()


@dataclass(frozen=True)
class Size:
    """One module's parameters and what its weights take resident, in bytes."""

    params: int
    bf16: int
    fp8_weight_only: int  # Linear weights in float8 with a float32 scale per output row; the rest bf16


def size_of(module: torch.nn.Module) -> Size:
    params = sum(p.numel() for p in module.parameters())
    linear_weights = linear_rows = 0
    seen: set[int] = set()  # tied weights (Qwen3's embeddings) count once, as parameters() does
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            linear_weights += m.weight.numel()
            linear_rows += m.weight.shape[0]
    return Size(params=params, bf16=2 * params, fp8_weight_only=2 * (params - linear_weights) + linear_weights + 4 * linear_rows)


def memory_table() -> dict[str, list[tuple[str, Size]]]:
    """Every family's parts and their sizes, computed from the configs above on the meta device."""
    return {family: [(role, size_of(on_meta(build))) for role, build in parts] for family, parts in FAMILIES.items()}


def markdown(table: dict[str, list[tuple[str, Size]]]) -> str:
    gib = 2**30
    lines = ["| model | part | parameters | bf16 GiB | fp8 weight-only GiB |", "|---|---|---:|---:|---:|"]
    for family, parts in table.items():
        for role, s in parts:
            lines.append(f"| {family} | {role} | {s.params / 1e9:.3f} B | {s.bf16 / gib:.2f} | {s.fp8_weight_only / gib:.2f} |")
        total_bf16 = sum(s.bf16 for _, s in parts)
        total_fp8 = sum(s.fp8_weight_only if role == "transformer" else s.bf16 for role, s in parts)
        lines.append(f"| {family} | all parts (fp8: transformer only) | {sum(s.params for _, s in parts) / 1e9:.3f} B | "
                     f"{total_bf16 / gib:.2f} | {total_fp8 / gib:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown(memory_table()) + "\n")
