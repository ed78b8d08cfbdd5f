"""What this machine computes fast: bf16 only pays where the CPU has bf16 matrix units.

On CPUs with AVX512-BF16 or AMX, bf16 matmuls run about 4× faster than fp32; on CPUs
without them (e.g. Ice Lake Xeons) torch emulates bf16 and it is about 4× *slower*
(measured here: 56 vs 243 GFLOP/s for a 2048² matmul). So "auto" picks per machine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """'auto' → bf16 on GPUs and on CPUs with bf16 units, else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device != "cpu":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]
