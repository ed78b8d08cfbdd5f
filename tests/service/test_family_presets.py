"""Published FLUX.2 [klein] and Qwen-Image-Edit presets, registered from configured weights
directories (INCONTEXT_MODEL_DIRS): listed with their licence, defaults and ranges, described
by their own spec pages, their ranges enforced with the schema's 422, and an edit through the
HTTP API under a hosted alias, on tiny random directories with the real engine in-process."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from incontext.cli import app as cli_app
from incontext.engine.local import LocalEngine
from incontext.service.app import build_registry, create_app
from incontext.settings import Settings
from incontext.testing import tiny_klein_dir, tiny_qwen_edit_dir

from .helpers import data_uri, png_bytes, wait_run

KEY = {"Authorization": "Bearer key-a"}


def _small(directory, **keep) -> None:
    """Serve the tiny weights at a tiny size, leaving steps and guidance to the published preset."""
    path = directory / "incontext.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data = {k: v for k, v in data.items() if k not in ("num_inference_steps", "guidance_scale")}
    path.write_text(json.dumps({**data, "target_area": 64 * 64, **keep}))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    klein = tiny_klein_dir(tmp_path_factory.mktemp("klein"), distilled=True)
    qwen = tiny_qwen_edit_dir(tmp_path_factory.mktemp("qwen"))
    _small(klein)
    _small(qwen, multiple=32)
    return {"flux-2-klein-4b": klein, "qwen-image-edit-plus": qwen}


class NoPreload(LocalEngine):
    """The real engine, which loads each model when its first request comes rather than the
    default (bundled) model at start: these tests never use that one."""

    async def start(self) -> None:
        self.start_thread()


@pytest.fixture(scope="module")
def client(model_dirs, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), api_keys=["key-a"], poll_interval_seconds=0.1,
                        model_dirs=model_dirs, engine_compile=False)
    engine = NoPreload(build_registry(settings), dtype="float32", max_batch_size=4)
    with TestClient(create_app(settings, engine=engine), headers=KEY) as c:
        yield c


def test_incontext_models_lists_the_configured_presets_with_licence_and_defaults(model_dirs):
    env = {"INCONTEXT_MODEL_DIRS": ",".join(f"{k}={v}" for k, v in model_dirs.items())}
    result = CliRunner().invoke(cli_app, ["models"], env=env, terminal_width=400)
    assert result.exit_code == 0, result.output
    text = result.output
    klein = text[text.index("flux-2-klein-4b"):text.index("qwen-image-edit-plus")]
    qwen = text[text.index("qwen-image-edit-plus"):]
    assert "black-forest-labs/flux-2-klein-4b" in klein and str(model_dirs["flux-2-klein-4b"]) in klein
    assert "4 steps (1–50), guidance 1 (1–20, ignored)" in klein and "$0.014 per image" in klein
    assert "Apache-2.0 (commercial use allowed)" in klein
    assert "40 steps (2–50), guidance 4 (1–20, true_cfg)" in qwen and "fal-ai/qwen-image-edit-plus" in qwen
    assert "Apache-2.0 (commercial use allowed)" in qwen
    assert "incontext/nano" in text  # the default model is still listed
    # Without the setting, no published preset is registered: nothing is downloaded.
    bare = CliRunner().invoke(cli_app, ["models"], env={"INCONTEXT_MODEL_DIRS": ""}, terminal_width=400)
    assert bare.exit_code == 0 and "flux-2-klein-4b" not in bare.output and "qwen-image-edit" not in bare.output


def test_each_spec_page_shows_its_own_defaults_and_ranges(client):
    card = client.get("/v1/models/qwen-image-edit-plus").json()
    fields = {e["name"]: e for e in card["inputs"]}
    assert card["defaults"] == {"guidance_scale": 4.0, "num_inference_steps": 40}
    assert (fields["num_inference_steps"]["minimum"], fields["num_inference_steps"]["maximum"]) == (2, 50)
    assert "true_cfg_scale" in fields["guidance_scale"]["description"]
    assert card["license"]["name"] == "Apache-2.0" and card["license"]["commercial_use"] is True

    spec = client.get("/v1/models/flux-2-klein-4b/llms.txt").text
    assert "| `num_inference_steps` | integer | 4 | 1–50 |" in spec
    assert "take no guidance" in spec and "Apache-2.0 (commercial use allowed" in spec
    assert "`black-forest-labs/flux-2-klein-4b`" in spec
    qwen_spec = client.get("/v1/models/fal-ai/qwen-image-edit-plus/llms.txt").text
    assert "| `num_inference_steps` | integer | 40 | 2–50 |" in qwen_spec and "| `guidance_scale` | number | 4.0 | 1.0–20.0 |" in qwen_spec


@pytest.mark.parametrize(("field", "value"), [("num_inference_steps", 1), ("guidance_scale", 25.0)])
def test_a_value_outside_the_models_range_is_a_422_naming_the_field(client, field, value):
    body = {"input": {"prompt": "p", "image_url": data_uri(png_bytes((64, 64))), field: value}}
    r = client.post("/v1/models/qwen-image-edit-plus/runs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "VALIDATION_ERROR"
    assert [e["field"] for e in r.json()["errors"]] == [f"input.{field}"]
    # One step is fine for a model whose range takes it.
    if field == "num_inference_steps":
        ok = client.post("/v1/models/flux-2-klein-4b/runs", json=body)
        assert ok.status_code == 201, ok.text
        wait_run(client, ok.json()["id"], timeout=600)


@pytest.mark.parametrize("alias", ["black-forest-labs/flux-2-klein-4b", "fal-ai/qwen-image-edit-plus"])
def test_an_edit_under_a_hosted_alias_runs_on_the_configured_weights(client, alias):
    body = {"input": {"prompt": "make it blue", "image_url": data_uri(png_bytes((64, 64))), "num_inference_steps": 2,
                      "output_format": "png", "preserve": "off"}}
    r = client.post(f"/v1/models/{alias}/runs", json=body)
    assert r.status_code == 201, r.text
    run = wait_run(client, r.json()["id"], timeout=600)
    assert run["status_code"] == "succeeded", run
    assert run["model_id"] == alias  # runs report a model's first hosted name, whichever name was called
    out = run["output"]["outputs"][0]
    assert (out["width"], out["height"]) == (64, 64)


def test_openai_and_replicate_clients_name_them_too(client):
    """The other surfaces resolve the published ids and aliases as the runs API does."""
    r = client.post("/v1/images/edits", data={"model": "flux-2-klein-4b", "prompt": "make it blue", "seed": "3"},
                    files={"image": ("in.png", png_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"]
    r = client.post("/v1/models/qwen/qwen-image-edit-plus/predictions", headers={"Prefer": "wait"},
                    json={"input": {"prompt": "make it blue", "input_images": [data_uri(), data_uri(png_bytes(color=(20, 200, 20)))]}})
    assert r.status_code in (200, 201), r.text
    prediction = r.json()
    deadline = time.monotonic() + 120
    while prediction["status"] in ("starting", "processing") and time.monotonic() < deadline:  # Prefer: wait may answer first
        time.sleep(0.2)
        prediction = client.get(f"/v1/predictions/{prediction['id']}").json()
    assert prediction["status"] == "succeeded" and prediction["output"], prediction
