"""Batch-invariant linears: a request's image must not depend on what else shares its steps.

Output i of a request is promised to be seed + i's image whatever else is in the batch (and
reproducible alone, or in stock diffusers). Most of a transformer's products have a token
axis: [batch × tokens, features] is tall at every batch size and BLAS keeps one kernel for it.
But the per-sample vectors, [batch, features] (the timestep, guidance and pooled-text
embeddings, and every block's AdaLayerNorm modulation), are as short as the batch, and BLAS
picks its kernel by the row count: on an AMD EPYC (MKL) rows 1–3 and 4 and more take
different kernels whose sums differ in the last bit, and a last bit is sometimes a pixel's
step of 1/255. So a Linear given a 2-D input runs as a batched product of one-row matrices:
the same kernel for every row whatever the batch, bit for bit. Those vectors are a sliver of
a step's work (about 1 % of nano's).

Applied from outside the model (`make_batch_invariant(transformer)`), as diffusers applies
its hooks: the model's code is stock.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        return F.linear(x, self.weight, self.bias)
    rows = torch.bmm(x.unsqueeze(1), self.weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)).squeeze(1)
    return rows if self.bias is None else rows + self.bias


def make_batch_invariant(module: torch.nn.Module) -> torch.nn.Module:
    """Make every nn.Linear in `module` take its 2-D inputs row by row; returns `module`."""
    for m in module.modules():
        if type(m) is torch.nn.Linear:  # subclasses (quantized layers) keep their own forward
            m.forward = types.MethodType(_forward, m)
    return module
