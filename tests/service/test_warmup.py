"""`incontext warmup`: the served model compiled once for this machine, found by every later start."""

from __future__ import annotations

from typer.testing import CliRunner

from incontext.cli import app
from incontext.engine.compiled import package_path
from incontext.models.loader import load_model
from incontext.models.registry import preset_for_directory

runner = CliRunner()


def test_warmup_builds_the_package_serve_loads_and_a_second_run_keeps_it(tiny_model, tiny_compile_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INCONTEXT_COMPILE_DIR", str(tiny_compile_dir))  # shared with the speed bench's test: one build
    args = ["warmup", "--data-dir", str(tmp_path), "--model-dir", str(tiny_model)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    package = package_path(tiny_compile_dir, tiny_model, load_model(tiny_model, max_sequence_length=preset_for_directory(tiny_model).max_sequence_length))
    assert (package / "transformer.pt2").is_file() and str(package.name) in first.output.replace("\n", "")
    built = package.stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already compiled" in again.output
    assert package.stat().st_mtime_ns == built
