"""Which licence a model preset reports: declared in its directory's incontext.json, else
recognised by the name its weights are published under."""

from __future__ import annotations

import json
from pathlib import Path, PurePath

import pytest

from incontext.models import licenses
from incontext.models.registry import DEFAULT_MODEL_ID, HOSTED_ALIASES, default_registry, preset_for_directory


@pytest.mark.parametrize(
    ("directory", "name", "commercial_use"),
    [
        ("FLUX.1-Kontext-dev", "FLUX.1 [dev] Non-Commercial License", False),
        ("FLUX.2-klein-4B", "Apache-2.0", True),
        ("FLUX.2-klein-base-4B", "Apache-2.0", True),
        ("FLUX.2-klein-9B", "FLUX Non-Commercial License", False),
        ("Qwen-Image-Edit-2511", "Apache-2.0", True),
        ("my-finetune", "unknown", None),
    ],
)
def test_published_weights_are_recognised_by_their_directory_name(tmp_path, directory, name, commercial_use):
    preset = preset_for_directory(_model_dir(tmp_path / directory))
    assert (preset.license.name, preset.license.commercial_use) == (name, commercial_use)


def test_a_hugging_face_cache_snapshot_goes_by_its_repository():
    snapshot = PurePath("/cache/hub/models--black-forest-labs--FLUX.1-Kontext-dev/snapshots/0123abc")
    assert licenses.known([], snapshot).commercial_use is False
    # Only the weights' own names count, not a folder above them.
    assert licenses.known([], PurePath("/models/FLUX.1-Kontext-dev/my-finetune")) is licenses.UNKNOWN


def test_a_registered_id_names_the_weights_but_a_hosted_alias_does_not(tmp_path):
    plain = _model_dir(tmp_path / "weights")
    assert preset_for_directory(plain, id="flux-kontext/dev").license.commercial_use is False
    # The hosted aliases say which API the server answers like, nothing about the weights.
    assert preset_for_directory(plain, id="incontext/nano", aliases=HOSTED_ALIASES).license is licenses.UNKNOWN


def test_a_declared_licence_wins_over_the_name(tmp_path):
    declared = _model_dir(tmp_path / "FLUX.1-Kontext-dev", license="Apache-2.0")
    assert preset_for_directory(declared).license == licenses.License("Apache-2.0", True)
    nc = _model_dir(tmp_path / "a", license="CC-BY-NC-4.0", license_url="https://example.org/l")
    assert preset_for_directory(nc).license == licenses.License("CC-BY-NC-4.0", False, "https://example.org/l")
    # A licence whose terms we cannot tell from its name: unknown, unless the file says.
    assert preset_for_directory(_model_dir(tmp_path / "b", license="Acme Model Licence")).license.commercial_use is None
    said = _model_dir(tmp_path / "c", license="Acme Model Licence", commercial_use=True)
    assert preset_for_directory(said).license.commercial_use is True
    # An empty declaration declares nothing.
    assert preset_for_directory(_model_dir(tmp_path / "Qwen-Image-Edit", license=" ")).license.name == "Apache-2.0"


def test_the_bundled_model_is_under_the_projects_licence():
    nano = default_registry().registered("flux-pro/kontext")
    assert nano.license == licenses.License("Apache-2.0", True) and nano.license.use == "commercial use allowed"


def test_outputs_name_a_model_by_its_id_or_else_its_directory_never_its_path(tmp_path):
    assert default_registry().registered("flux-pro/kontext").weights_name == "incontext/nano"
    editor = _model_dir(tmp_path / "my-editor")
    assert preset_for_directory(editor, id="team/editor").weights_name == "team/editor"  # the operator's name for it
    assert preset_for_directory(editor).weights_name == "my-editor"  # given by path
    assert preset_for_directory(editor, id=DEFAULT_MODEL_ID, aliases=HOSTED_ALIASES).weights_name == "my-editor"  # INCONTEXT_MODEL_DIR
    snapshot = _model_dir(tmp_path / "hub" / "models--black-forest-labs--FLUX.1-Kontext-dev" / "snapshots" / "0123abc")
    assert preset_for_directory(snapshot).weights_name == "black-forest-labs/FLUX.1-Kontext-dev"


def _model_dir(path: Path, **declared) -> Path:
    """A model directory as far as its preset is concerned: its name and its incontext.json."""
    path.mkdir(parents=True)
    if declared:
        (path / "incontext.json").write_text(json.dumps(declared))
    return path
