"""Loading model directories: any FluxKontextPipeline layout, clear errors when a part is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from incontext.errors import ModelError, ModelNotFound
from incontext.models.loader import load_model
from incontext.models.registry import DEFAULT_MODEL_ID, HOSTED_ALIASES, default_registry


def test_loads_in_the_requested_dtype(tiny_model):
    m = load_model(tiny_model, dtype="bfloat16")
    assert next(m.transformer.parameters()).dtype == torch.bfloat16
    assert next(m.vae.parameters()).dtype == torch.float32
    assert m.max_sequence_length == 32


def test_missing_part_is_named(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match="missing: vae"):
        load_model(broken)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ModelError, match="model_index.json"):
        load_model(tmp_path)


def test_mismatched_parts_are_named(tiny_model, tmp_path):
    broken = tmp_path / "mismatch"
    shutil.copytree(tiny_model, broken)
    cfg_path = broken / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["latent_channels"] = 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="vae"):
        load_model(broken)


def test_hosted_aliases_resolve_to_the_default_model():
    reg = default_registry()
    for alias in HOSTED_ALIASES:
        assert reg.resolve(alias).id == DEFAULT_MODEL_ID
    assert reg.resolve("/flux-pro/kontext/").id == DEFAULT_MODEL_ID
    with pytest.raises(ModelNotFound, match="known models"):
        reg.resolve("no-such-model")


def test_a_directory_is_a_model_id(tiny_model):
    preset = default_registry().resolve(str(tiny_model))
    assert preset.directory == tiny_model.resolve() and preset.num_inference_steps == 4
