"""Published presets: registered only for a configured directory, under the hosted names, with
their defaults and ranges; the directory's incontext.json has the last word; a preset that
contradicts itself or takes another model's name is refused."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from incontext.errors import ModelError
from incontext.models.registry import PUBLISHED, default_registry
from incontext.settings import Settings


def _model_dir(path: Path, **incontext) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    if incontext:
        (path / "incontext.json").write_text(json.dumps(incontext))
    return path


def test_a_published_id_gets_its_published_preset_only_when_configured(tmp_path):
    assert not set(PUBLISHED) & set(default_registry().ids())
    reg = default_registry({"flux-2-klein-9b": _model_dir(tmp_path / "k9"), "qwen-image-edit-plus": _model_dir(tmp_path / "q")})
    klein = reg.registered("black-forest-labs/flux-2-klein-9b")
    assert (klein.id, klein.num_inference_steps, klein.max_sequence_length, klein.guidance_kind) == ("flux-2-klein-9b", 4, 512, "ignored")
    assert klein.license.commercial_use is False  # BFL publishes the 9B for non-commercial use only
    qwen = reg.registered("fal-ai/qwen-image-edit-plus")
    assert (qwen.num_inference_steps, qwen.guidance_scale, qwen.steps_range, qwen.guidance_kind) == (40, 4.0, (2, 50), "true_cfg")
    assert qwen.license.name == "Apache-2.0" and qwen.run_model_id == "fal-ai/qwen-image-edit-plus"
    assert reg.registered("qwen-image-edit-plus") is qwen


def test_the_directory_has_the_last_word_and_other_ids_keep_their_own(tmp_path):
    tuned = _model_dir(tmp_path / "t", num_inference_steps=8, steps_range=[4, 12], price_per_image="0.02", license="CC-BY-NC-4.0")
    reg = default_registry({"flux-2-klein-4b": tuned, "team/editor": _model_dir(tmp_path / "e")})
    klein = reg.registered("flux-2-klein-4b")
    assert (klein.num_inference_steps, klein.steps_range, klein.price_per_image) == (8, (4, 12), Decimal("0.02"))
    assert klein.license.commercial_use is False and klein.aliases == ("black-forest-labs/flux-2-klein-4b",)
    editor = reg.registered("team/editor")
    assert (editor.num_inference_steps, editor.steps_range, editor.aliases) == (20, (1, 50), ())


def test_out_of_range_names_each_field_outside_the_models_range(tmp_path):
    preset = default_registry({"qwen-image-edit": _model_dir(tmp_path / "q")}).registered("qwen-image-edit")
    assert preset.out_of_range(50, 4.0) == {}
    wrong = preset.out_of_range(1, 20.5)
    assert set(wrong) == {"num_inference_steps", "guidance_scale"} and "2 to 50" in wrong["num_inference_steps"]


def test_a_preset_that_contradicts_itself_or_takes_a_used_name_is_refused(tmp_path):
    with pytest.raises(ModelError, match="outside its range"):
        default_registry({"flux-2-klein-4b": _model_dir(tmp_path / "a", num_inference_steps=20, steps_range=[1, 8])})
    with pytest.raises(ModelError, match="outside its range"):
        default_registry({"qwen-image-edit": _model_dir(tmp_path / "b", guidance_range=[0, 30])})  # wider than the API takes
    with pytest.raises(ModelError, match="flux-pro/kontext already names another model"):
        default_registry({"flux-pro/kontext": _model_dir(tmp_path / "c")})
    with pytest.raises(ModelError, match="consensus 9 is outside 1–8"):
        default_registry({"team/editor": _model_dir(tmp_path / "d", consensus=9)})
    assert default_registry({"team/editor": _model_dir(tmp_path / "e", consensus=3)}).registered("team/editor").consensus == 3


def test_model_dirs_setting_takes_id_directory_pairs(monkeypatch):
    monkeypatch.setenv("INCONTEXT_MODEL_DIRS", " flux-2-klein-4b=/w/klein , qwen-image-edit-plus=/w/qwen,")
    assert Settings().model_dirs == {"flux-2-klein-4b": Path("/w/klein"), "qwen-image-edit-plus": Path("/w/qwen")}
    monkeypatch.setenv("INCONTEXT_MODEL_DIRS", "/w/klein")
    with pytest.raises(ValidationError, match="id=directory"):
        Settings()
