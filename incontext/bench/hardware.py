"""What the speed benchmark's figures are measured against: the CPU (its matmul peak and the
instruction sets that decide the numerics) and the FLOPs of one transformer pass."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

MATMUL_SIZE = 2048


def matmul_peak(dtype: torch.dtype, size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` size² × size² products (after one warm-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def transformer_flops(config, image_tokens: int, text_tokens: int, attention: bool = True) -> float:
    """FLOPs (2 per multiply-add) of one `FluxTransformer2DModel` pass for one sample: its
    linear layers, plus attention's two products (QKᵀ and AV) if `attention`. Norms,
    activations, RoPE and softmax are left out. `image_tokens` counts target + context."""
    d = config.num_attention_heads * config.attention_head_dim
    s = image_tokens + text_tokens
    out_channels = config.out_channels or config.in_channels
    # per sample: time (and guidance) and pooled-text embedders, the adaLN modulations
    per_sample = 256 * d + d * d + config.pooled_projection_dim * d + d * d
    if config.guidance_embeds:
        per_sample += 256 * d + d * d
    per_sample += config.num_layers * 2 * 6 * d * d + config.num_single_layers * 3 * d * d + 2 * d * d
    # per token: input projections, output projection
    tokens = image_tokens * config.in_channels * d + text_tokens * config.joint_attention_dim * d + image_tokens * d * out_channels
    # each block: q, k, v, out (4d²) and the MLP (8d²) per token; single blocks fuse the
    # same shapes (qkv 3d², mlp-in 4d², out 5d²); attention 2·s²·d
    blocks = (config.num_layers + config.num_single_layers) * (12 * s * d * d + (2 * s * s * d if attention else 0))
    return 2.0 * (per_sample + tokens + blocks)


def machine() -> dict:
    """The CPU the figures were taken on: its model, cores and the instruction sets that decide
    the numerics (docs/engine.md: bf16 is emulated without AVX512-BF16 or AMX)."""
    import os
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": name, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
