"""`run_quality` and `incontext bench quality` end to end on a tiny random model."""

import json
import math

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from incontext.bench import quality
from incontext.bench.cli import register
from incontext.bench.quality import GROUND_TRUTH, IDENTITY, run_quality
from incontext.testing import tiny_model_dir
from incontext.world.edits import FAMILIES


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    results = run_quality(str(model_dir), 2, out, turns=2, steps=1, dtype="float32", drift_scenes=1)
    return results, out


def _row(results, name):
    return next(r for r in results["rows"] if r["name"] == name)


def test_writes_the_report_the_results_and_a_grid_per_family(run):
    results, out = run
    report = (out / "report.md").read_text()
    assert report.startswith("# Quality benchmark")
    assert "| family | row | n | success | change made | rest kept |" in report
    assert json.loads((out / "results.json").read_text())["n_per_family"] == 2
    for family in FAMILIES:
        assert (out / f"grid_{family}.png").is_file()
    assert (out / "grid_multiturn.png").is_file()


def test_ground_truth_and_identity_are_the_extremes(run):
    results, _ = run
    truth, identity = _row(results, GROUND_TRUTH), _row(results, IDENTITY)
    assert all(truth["families"][f]["success"] == 1.0 for f in FAMILIES)
    assert all(identity["families"][f]["success"] == 0.0 for f in FAMILIES)
    # Split in its halves: the truth makes every change and keeps the rest; the input unchanged makes none.
    assert all(truth["families"][f]["changed"] == truth["families"][f]["kept"] == 1.0 for f in FAMILIES)
    assert all(identity["families"][f]["changed"] == 0.0 for f in FAMILIES)
    assert truth["all"]["psnr"] == math.inf
    assert identity["all"]["preservation_psnr"] == math.inf
    assert identity["drift"]["turn_last"] == math.inf and identity["drift"]["drift_db"] == 0.0
    assert truth["seconds_per_edit"] is None and identity["seconds_per_edit"] is None


def test_the_autoencoder_is_scored_raw_and_as_preservation_serves_it(run):
    """The preserved round trip keeps the input's own pixels outside the edit, so it keeps the
    rest at least as well as the raw round trip does."""
    results, _ = run
    raw, preserved = _row(results, "autoencoder (target round trip)"), _row(results, "autoencoder, preserve auto")
    assert set(raw["families"]) == set(preserved["families"]) == set(FAMILIES)
    assert preserved["all"]["preservation_psnr"] >= raw["all"]["preservation_psnr"]
    assert preserved["seconds_per_edit"] is None


def test_the_model_row_is_scored_and_timed(run):
    results, _ = run
    model = results["rows"][0]
    assert model["name"] not in (GROUND_TRUTH, IDENTITY)
    assert model["all"]["n"] == 2 * len(FAMILIES)
    assert 0.0 <= model["all"]["success"] <= 1.0
    assert math.isfinite(model["all"]["psnr"]) and model["seconds_per_edit"] > 0
    assert len(model["drift"]["preservation_psnr_by_turn"]) == 2


def test_drift_is_also_measured_on_the_engines_cached_latents(run):
    results, out = run
    model, (reuse,) = results["rows"][0], results["drift_rows"]
    assert "cached latents" in reuse["name"] and reuse["name"] in (out / "report.md").read_text()
    assert len(reuse["drift"]["preservation_psnr_by_turn"]) == 2
    # Turn 1 is the same edit with the same seed (only turn 2 starts from cached latents). The
    # two paths decode to within a level of each other, and on this random model many pixels sit
    # at preserve's thresholds against the autoencoder's rendering, so a few of them flip (and
    # snapping decides whole segments of the input at once, so a flip can take a segment with it).
    assert abs(reuse["drift"]["turn_1"] - model["drift"]["turn_1"]) < 1.0


def _cli():
    app = typer.Typer()
    app.command("version")(lambda: None)  # a second command keeps `bench` a sub-command, as in incontext.cli
    register(app)
    return app


def test_cli_passes_its_options_and_prints_the_table(run, monkeypatch, tmp_path):
    calls = []

    def fake_run_quality(model, n, out, **options):
        calls.append((model, n, out, options))
        return run[0]

    monkeypatch.setattr(quality, "run_quality", fake_run_quality)
    args = ["bench", "quality", "--model", "some/model", "--n", "3", "--turns", "4", "--steps", "2",
            "--guidance", "2.5", "--dtype", "float32", "--families", "basic", "--out", str(tmp_path)]
    result = CliRunner().invoke(_cli(), args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    (model, n, out, options) = calls[0]
    assert (model, n, out) == ("some/model", 3, tmp_path)
    assert {k: options[k] for k in ("turns", "steps", "guidance", "dtype", "families")} == {
        "turns": 4, "steps": 2, "guidance": 2.5, "dtype": "float32", "families": "basic"}
    assert "ground truth" in result.output and "input unchanged" in result.output and "100%" in result.output


def test_cli_reports_an_unknown_model(tmp_path):
    result = CliRunner().invoke(_cli(), ["bench", "quality", "--model", "no/such-model", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "MODEL_UNAVAILABLE" in result.output


def test_a_subset_of_families_is_scored_alone(model_dir, tmp_path):
    results = run_quality(str(model_dir), 1, tmp_path, turns=1, steps=1, dtype="float32", drift_scenes=1, families="remove,invert")
    assert results["families"] == ["remove", "invert"]
    assert set(results["rows"][0]["families"]) == {"remove", "invert"}
    assert quality.select_families("basic") == ("recolor", "remove", "add", "move", "background", "grayscale")


def test_other_edit_regions_add_rows_from_the_same_denoising(model_dir, tmp_path):
    results = run_quality(str(model_dir), 1, tmp_path, turns=1, steps=1, dtype="float32", drift_scenes=1, families="recolor",
                          regions=("contrast", "both"))
    names = [r["name"] for r in results["rows"]]
    assert names[2:4] == [f"{names[0]}, region by contrast", f"{names[0]}, region by both"]
    assert all(r["families"]["recolor"]["n"] == 1 for r in results["rows"][2:4])
    assert "region by contrast" in (tmp_path / "report.md").read_text()


def test_both_keeps_only_the_moved_latents_near_the_contrasts_mask():
    change = np.zeros((8, 8), np.float32)
    change[1, 1] = change[6, 6] = 1.0  # two moved latents
    contrast = np.zeros((8, 8), np.float32)
    contrast[1, 2] = 1.0  # the instruction points next to the first
    kept, _ = quality.contrast_region(change, contrast, "both")
    assert kept[1, 1] == 1.0 and kept[6, 6] == 0.0
    marked, config = quality.contrast_region(change, contrast, "contrast")
    assert marked[1, 2] > config.threshold and (marked > config.threshold).sum() == 1


def test_an_unknown_region_is_refused_with_a_code(model_dir, tmp_path):
    result = CliRunner().invoke(_cli(), ["bench", "quality", "--model", str(model_dir), "--regions", "pixels", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "INVALID_INPUT" in result.output and "pixels" in result.output


def test_an_unknown_family_is_refused_with_a_code(model_dir, tmp_path):
    result = CliRunner().invoke(_cli(), ["bench", "quality", "--model", str(model_dir), "--families", "recolor,teleport", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "INVALID_INPUT" in result.output and "teleport" in result.output


def test_workflow_rows_score_each_family_against_its_exact_mask(model_dir, tmp_path, monkeypatch):
    from incontext import sampler

    calls = []
    denoise = sampler.denoise

    def spy(m, image, prompt, **kwargs):
        calls.append((prompt, len(kwargs.get("references", ()))))
        return denoise(m, image, prompt, **kwargs)

    monkeypatch.setattr(sampler, "denoise", spy)
    results = run_quality(str(model_dir), 2, tmp_path, turns=1, steps=1, dtype="float32", drift_scenes=1, families="workflows")
    assert results["families"] == ["remove", "bgref", "emblem", "segment"]
    # The second image reaches the model as a request's reference does; other edits have none.
    second = {"second", "other", "emblem", "logo"}
    assert calls and all(refs == (1 if second & set(prompt.split()) else 0) for prompt, refs in calls)
    assert any(refs for _, refs in calls)

    truth, identity, model = _row(results, GROUND_TRUTH), _row(results, IDENTITY), results["rows"][0]
    t, i, m = truth["workflows"], identity["workflows"], model["workflows"]
    assert set(t) == set(i) == set(m) == {"remove", "bgref", "emblem", "segment"}
    assert all(t[f]["success"] == 1.0 and i[f]["success"] == 0.0 for f in t)
    assert t["remove"]["fill_psnr"] == t["bgref"]["background_psnr"] == t["emblem"]["box_psnr"] == math.inf
    assert t["segment"]["iou"] == 1.0 and i["segment"]["iou"] < 0.5
    # The segmentation workflow's mask (the removed regions the drawn mask picks) from the exact
    # removal is the object's visible pixels but for a rim pixel or so; nothing removed, no mask.
    assert t["segment"]["workflow_iou"] > 0.99 and t["segment"]["workflow_at_goal"] == 1.0
    assert i["segment"]["workflow_iou"] == 0.0
    assert "the workflow's mask, as a user gets it" in (tmp_path / "report.md").read_text()
    # The segmentation and object-removal workflows ask the model for a mask of the thing
    # beside the removal, in their own words; the exact pair passes, the input left alone fails.
    assert sum(prompt.startswith("make a mask of the ") for prompt, _ in calls) == 4  # 2 segment + 2 remove examples
    assert t["remove"]["workflow_success"] == 1.0 and t["remove"]["workflow_kept_psnr"] == math.inf
    assert i["remove"]["workflow_success"] == 0.0
    assert "the object-removal workflow" in (tmp_path / "report.md").read_text()
    # The logo-placement workflow lays the logo's own pixels in the box at the place asked,
    # whatever the model drew there (the input left unchanged, here), and nothing else.
    assert i["emblem"]["workflow_success"] == 1.0 and i["emblem"]["workflow_kept_psnr"] == math.inf
    assert i["emblem"]["workflow_value"] > 20 > i["emblem"]["box_psnr"]
    assert "the logo-placement workflow" in (tmp_path / "report.md").read_text()
    # The background-replace workflow lets the edit change only the input's backdrop: the exact
    # replacement passes as it is, and whatever the model does, the objects stay the input's.
    assert t["bgref"]["workflow_success"] == 1.0 and t["bgref"]["workflow_value"] > 40
    assert m["bgref"]["workflow_kept_psnr"] >= 40 > m["bgref"]["kept_psnr"]
    assert "the background-replace workflow" in (tmp_path / "report.md").read_text()
    assert all(i[f]["kept_psnr"] == math.inf and i[f]["kept_at_goal"] == 1.0 for f in ("remove", "bgref", "emblem"))
    assert i["remove"]["fill_psnr"] < 30  # the object left in place is not the background
    assert not any(math.isnan(m[f]["kept_psnr"]) for f in ("remove", "bgref", "emblem"))
    assert 0.0 <= m["segment"]["iou"] <= 1.0 and 0.0 <= m["remove"]["kept_at_goal"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "## Workflows" in report and "mask IoU" in report and "emblem in its box" in report


def test_an_edit_draws_the_same_noise_whichever_families_run_before_it(model_dir):
    """Runs of a subset of families, or in another order, score the same outputs for the
    edits they share: an edit's seed is its own, not its place in the run."""
    from incontext.bench import heldout
    from incontext.models.loader import load_model

    models = load_model(model_dir, dtype="float32")
    recolor, remove = heldout.heldout_examples("recolor", 1)[0], heldout.heldout_examples("remove", 1)[0]
    alone = quality.ModelEditor(models, 1, 3.5, preserve="off")(recolor, recolor.context)
    after = quality.ModelEditor(models, 1, 3.5, preserve="off")
    after(remove, remove.context)
    assert after(recolor, recolor.context).tobytes() == alone.tobytes()
    assert quality.edit_seed(0, recolor) != quality.edit_seed(0, remove)
    # another noise draws another output on this random model: the seed reaches the sampler
    other = quality.ModelEditor(models, 1, 3.5, seed=1, preserve="off")(recolor, recolor.context)
    assert other.tobytes() != alone.tobytes()


def test_the_workflows_that_turn_true_cfg_off_are_scored_from_edits_without_it(model_dir, tmp_path, monkeypatch):
    """A model declaring true CFG: its own rows edit with it, while the object-removal workflow's
    removal and the logo-placement workflow's edits run without it, as the service runs them."""
    from incontext import sampler
    from incontext.bench import heldout
    from incontext.testing import declaring

    guided = declaring(model_dir, tmp_path / "guided", true_cfg_scale=2.0)
    calls = []
    denoise = sampler.denoise

    def spy(m, image, prompt, **kwargs):
        calls.append((prompt, kwargs.get("true_cfg", True)))
        return denoise(m, image, prompt, **kwargs)

    monkeypatch.setattr(sampler, "denoise", spy)
    run_quality(str(guided), 1, tmp_path / "out", turns=1, steps=1, dtype="float32", drift_scenes=1, families="remove,emblem")
    held = [ex.instruction for f in ("remove", "emblem") for ex in heldout.heldout_examples(f, 1)]
    removals = [quality.workflows.workflow_example(ex).instruction for ex in heldout.heldout_examples("remove", 1)]
    without = [prompt for prompt, cfg in calls if not cfg]
    assert sorted(without) == sorted(removals + [ex.instruction for ex in heldout.heldout_examples("emblem", 1)])
    assert all((prompt, True) in calls for prompt in held)  # the model's own rows keep it
