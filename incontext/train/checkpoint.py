"""Self-describing training checkpoints: weights, model config, training config and step.

Anything can rebuild the model from the file alone; optimizer state rides along so a run
resumes exactly, but is disposable (a fresh optimizer can resume from the weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(path: Path, *, step: int, model_config: dict, train_config: dict, weights: dict, optimizer=None, extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "step": step,
        "model_config": model_config,
        "train_config": train_config,
        "weights": weights,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path), map_location="cpu", weights_only=False)
