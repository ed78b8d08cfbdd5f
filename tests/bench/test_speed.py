"""`run_speed` and `incontext bench speed` end to end on a tiny random model: every
configuration runs, the report files hold every field, and the numbers are sane. No timing
thresholds: a tiny model on a shared machine says nothing about speed."""

import json
import math
import threading
import time

import pytest
import torch
import typer
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from incontext import sampler
from incontext.bench import speed
from incontext.bench.cli import register
from incontext.bench.hardware import transformer_flops
from incontext.bench.speed import Record, closed_loop, run_speed
from incontext.models.loader import load_model

ROWS = ["stock diffusers float32", "stock diffusers bfloat16", "engine ×1", "engine ×2", "engine fast ×1", "engine fast ×2",
        "HTTP cold start ×1 (first 1 s)", "HTTP ×1", "HTTP ×2", "HTTP aggressive pollers ×2", "HTTP fast ×2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    # 4 steps with "2,1,1" computes steps {0, 1, 3}: the fast rows really skip one.
    results = run_speed(str(tiny_model), 2, out, steps=4, concurrency=(1, 2), step_cache="2,1,1", threads=1, matmul_size=256,
                        compile=False, cold_seconds=1)  # compiling: tests/engine/test_compiled.py
    return results, out


def test_writes_the_report_the_results_and_the_chart(run):
    results, out = run
    assert (out / "report.md").read_text().startswith("# Speed benchmark")
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ROWS
    assert Image.open(out / "speed.png").size[1] > 100
    assert (out / "server.log").is_file()


def test_every_configuration_is_measured(run):
    results, _ = run
    assert results["reference"] == "stock diffusers float32" or results["reference"] == "stock diffusers bfloat16"
    assert results["peak_gflops_per_second"]["float32"] > 0 and results["peak_gflops_per_second"]["bfloat16"] > 0
    for row in results["rows"]:
        # the cold-start row edits for as long as its window lasts (here one edit at least)
        assert row["n"] == 2 or (row["name"].startswith("HTTP cold start") and row["n"] >= 1)
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert row["images_per_second"] > 0 and row["throughput_vs_stock"] > 0
    engines = [r for r in results["rows"] if r["kind"] == "engine"]
    assert all(r["transformer_gflops_per_second"] > 0 and 0 < r["fraction_of_peak"] for r in engines)
    assert [r["transformer_evals_per_image"] for r in engines] == [4, 4, 3, 3]


def test_http_rows_have_overhead_and_match_the_engine(run):
    results, out = run
    http = [r for r in results["rows"] if r["kind"] == "http"]
    engine_dtype = next(r["dtype"] for r in results["rows"] if r["kind"] == "engine")
    # cold start; exact at each level; aggressive pollers and the fast preset at the largest
    assert [r["concurrency"] for r in http] == [1, 1, 2, 2, 2]
    assert [r["transformer_evals_per_image"] for r in http] == [4, 4, 4, 4, 3]
    assert [r["step_cache"] for r in http] == [False, False, False, False, True]  # so the fast row is held to the fast engine
    assert http[0]["compiled_share"] == 0.0  # nothing compiled in its first second: it served eagerly
    for row in http:
        assert row["http_overhead_p50_ms"] > 0
        assert row["observed_latency_p50_ms"] >= row["latency_p50_ms"] - 1  # polling only ever adds
        # The same engine (and step cache) behind HTTP, up to float rounding: the server's engine
        # runs in its own process on the machine's threads, where BLAS sums in another order,
        # and a random tiny model (its VAE above all) grows last bits into a few levels of 255
        # (3 seen in fp32; 8 where the engine computes in bf16, its VAE in bf16 autocast, whose
        # steps are 2^-8); another sampler is tens off, as is fp32 against bf16 (17).
        assert row["max_pixel_diff_to_engine_x1"] <= (4 if engine_dtype == "float32" else 12)
        split = row["overhead_split_p50_ms"]  # where the overhead went, from the server's own timings
        assert split["post"] > 0 and split["dispatch_input"] > 0 and split["dispatch_output"] > 0 and split["engine_hop"] >= 0
    assert "Where the HTTP overhead goes" in (out / "report.md").read_text()
    server = results["server"]
    assert 0 < server["start_to_healthy_s"] <= server["start_to_first_accepted_s"]


def test_fast_preset_quality_and_goals(run):
    results, _ = run
    q = results["step_cache_quality"]
    assert q["evals_per_image"] == 3 and q["fewer_evals"] == pytest.approx(4 / 3)
    assert math.isfinite(q["psnr_fast_to_exact_db"]) and q["psnr_loss_db"] == pytest.approx(q["psnr_exact_to_targets_db"] - q["psnr_fast_to_targets_db"])
    goals = {g["goal"]: g for g in results["goals"]}
    assert len(goals) == 11 and all(g["met"] in (True, False, None) for g in goals.values())
    assert goals["throughput at 16 concurrent (HTTP) vs stock"]["met"] is None  # 16 was not run
    assert goals["throughput at 16 concurrent (HTTP) vs stock, fast preset"]["met"] is None
    assert goals["fast preset: fewer evaluations"]["met"] is False  # 1.33× < 1.8×


def test_skipping_stock_and_http(tiny_model, tiny_compile_dir, tmp_path):
    # Compiled as the server does by default, with the eager engine beside it (unless the
    # compile failed, e.g. without a C++ compiler: then the engine rows are eager and alone).
    results = run_speed(str(tiny_model), 1, tmp_path, steps=2, concurrency=(1,), skip_stock=True, skip_http=True, threads=1, matmul_size=128,
                        compile_dir=tiny_compile_dir)
    compiled = results["compile"]["failed"] is None
    assert [r["name"] for r in results["rows"]] == ["engine ×1", "engine fast ×1"] + (["engine eager ×1"] if compiled else [])
    assert results["compile"]["load_seconds"] > 0 if compiled else results["compile"]["failed"]
    assert results["machine"]["cores"] >= 1 and "Machine:" in (tmp_path / "report.md").read_text()
    assert results["reference"] is None and results["server"] is None
    assert "throughput_vs_stock" not in results["rows"][0]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "speed.png").is_file()


def test_flops_estimate_matches_the_counted_matmuls(tiny_model):
    m = load_model(tiny_model, dtype="float32")
    n, length = 16, m.max_sequence_length  # 64×64 pixels: 4×4 tokens
    x = torch.randn(1, n, m.transformer.config.in_channels)
    img_ids, txt_ids = sampler.kontext_ids(64, 64, m.vae_scale_factor, length)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sampler.predict_velocity(m, img=x, img_cond=x, txt=torch.randn(1, length, m.transformer.config.joint_attention_dim),
                                 vec=torch.randn(1, m.transformer.config.pooled_projection_dim), timesteps=torch.tensor([500.0]),
                                 guidance=torch.tensor([3.5]), img_ids=img_ids, txt_ids=txt_ids)
    # The counter sees the linear layers (CPU attention is not counted by it).
    assert transformer_flops(m.transformer.config, 2 * n, length, attention=False) == counter.get_total_flops()
    assert transformer_flops(m.transformer.config, 2 * n, length) > counter.get_total_flops()


def test_closed_loop_keeps_at_most_c_requests_in_flight():
    in_flight, most, lock = 0, 0, threading.Lock()

    def call(job):
        nonlocal in_flight, most
        sent = time.perf_counter()
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.01)
        with lock:
            in_flight -= 1
        return Record(sent, time.perf_counter(), evals=job)

    records, wall = closed_loop(call, list(range(7)), 3)
    assert [r.evals for r in records] == list(range(7)) and most == 3 and wall > 0


def _cli():
    app = typer.Typer()
    app.command("version")(lambda: None)  # a second command keeps `bench` a sub-command, as in incontext.cli
    register(app)
    return app


def test_cli_passes_its_options_and_prints_the_tables(run, monkeypatch, tmp_path):
    calls = []

    def fake_run_speed(model, n, out, **options):
        calls.append((model, n, out, options))
        return run[0]

    monkeypatch.setattr(speed, "run_speed", fake_run_speed)
    args = ["bench", "speed", "--model", "some/model", "--n", "3", "--steps", "2", "--concurrency", "1,4", "--out", str(tmp_path),
            "--skip-stock", "--skip-http", "--step-cache", "3,3,2", "--threads", "1", "--no-compile"]
    result = CliRunner().invoke(_cli(), args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    model, n, out, options = calls[0]
    assert (model, n, out) == ("some/model", 3, tmp_path)
    assert options["concurrency"] == (1, 4) and options["skip_stock"] and options["skip_http"]
    assert (options["steps"], options["step_cache"], options["threads"], options["compile"]) == (2, "3,3,2", 1, False)
    assert "engine fast ×1" in result.output and "HTTP overhead" in result.output and "goals" in result.output


def test_cli_refuses_bad_concurrency(tmp_path):
    result = CliRunner().invoke(_cli(), ["bench", "speed", "--concurrency", "1,x", "--out", str(tmp_path)])
    assert result.exit_code == 2


def test_stock_row_follows_a_model_that_starts_at_the_context(tiny_model, tmp_path):
    """Stock diffusers is handed our starting latents for a context-start model, so its
    images are the ones our sampler makes (and the speed ratio compares equal work)."""
    import json
    import shutil

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from incontext import sampler
    from incontext.bench.speed import Job
    from incontext.bench.speed_stock import run_stock
    from incontext.models.loader import load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    extra = json.loads((model / "incontext.json").read_text()) if (model / "incontext.json").is_file() else {}
    (model / "incontext.json").write_text(json.dumps({**extra, "flow_start": "context", "start_noise": 0.3}))
    image = Image.new("RGB", (64, 48), (230, 230, 220))
    ImageDraw.Draw(image).ellipse((8, 8, 30, 30), fill=(200, 30, 30))
    row = run_stock(model, torch.float32, [Job("make the circle blue", image, image, 64, 48, 5)], 3, 3.5, 32)
    ours = sampler.edit(load_model(model, dtype="float32", max_sequence_length=32), image, "make the circle blue", seeds=[5], num_steps=3)[0]
    diff = np.abs(np.asarray(row.records[0].image, dtype=float) - np.asarray(ours, dtype=float)).mean()
    assert diff <= 1.0


def test_every_family_has_a_batching_row_over_stock(tmp_path):
    """Kontext, Klein and Qwen-Image-Edit: stock one at a time against our engine with several
    in flight, on tiny random directories; the same outputs as stock."""
    from incontext.bench import families

    rows = families.tiny_rows(tmp_path, n=2, concurrency=2, steps=2, size=64)
    assert [r["family"] for r in rows] == ["FLUX.1 Kontext", "FLUX.2 [klein]", "Qwen-Image-Edit-Plus"]
    for r in rows:
        for key in ("stock_s_per_image", "engine_x1_p50_s", "engine_concurrent_images_per_s", "throughput_over_stock"):
            assert r[key] > 0, (r["family"], key)
        assert r["mean_pixel_diff_to_stock"] < 1.0, r["family"]  # of 255: the engine's edit is stock's
        assert r["mean_pixel_diff_concurrent_to_alone"] < 1.0, r["family"]
    assert "| FLUX.2 [klein] | 64x64, 2 |" in families.markdown(rows)


def test_stock_row_draws_a_model_s_consensus_and_gives_the_engine_s_output(tiny_model, tmp_path):
    """A model directory that declares three draws: stock diffusers makes them in one call (one
    generator per draw seed) and the median of their latents is decoded, so the stock row does
    the engine's work and its image is our sampler's."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from incontext import sampler
    from incontext.bench.speed import Job
    from incontext.bench.speed_stock import run_stock
    from incontext.models.loader import load_model

    image = Image.new("RGB", (64, 48), (230, 230, 220))
    ImageDraw.Draw(image).ellipse((8, 8, 30, 30), fill=(200, 30, 30))
    row = run_stock(tiny_model, torch.float32, [Job("make the circle blue", image, image, 64, 48, 5)], 3, 3.5, 32, consensus=3)
    m = load_model(tiny_model, dtype="float32", max_sequence_length=32)
    ours = sampler.edit(m, image, "make the circle blue", seeds=[5], num_steps=3, consensus=3)[0]
    single = sampler.edit(m, image, "make the circle blue", seeds=[5], num_steps=3)[0]
    stock = np.asarray(row.records[0].image, dtype=float)
    assert row.records[0].evals == 9
    assert np.abs(stock - np.asarray(ours, dtype=float)).mean() <= 1.0
    assert np.abs(stock - np.asarray(single, dtype=float)).mean() > 1.0  # the median is not draw 0


def test_http_rows_count_every_draw_of_a_model_with_consensus(tiny_model, tmp_path):
    """The server does not report its passes: the benchmark counts them, steps × the model's
    draws (and the step cache's count of the steps × the draws for the fast server). With one
    client the server still batches the draws, as a server with default settings does."""
    import json
    import shutil

    from incontext.bench.speed_http import HttpClient, Server

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    extra = json.loads((model / "incontext.json").read_text()) if (model / "incontext.json").is_file() else {}
    (model / "incontext.json").write_text(json.dumps({**extra, "consensus": 3}))
    servers = [Server(model, 1, 1, tmp_path / "a.log"), Server(model, 1, 1, tmp_path / "b.log", step_cache="3,3,2")]
    try:
        exact, fast = (HttpClient(server, "m", 10, 3.5, 0.1) for server in servers)
        assert exact.evals == 30
        assert fast.evals == 21
        assert all(int(server.env["INCONTEXT_ENGINE_MAX_BATCH_SIZE"]) >= 3 for server in servers)
    finally:
        for server in servers:
            server.stop()  # never started: removes its data dir


def test_one_request_s_draws_share_its_steps_as_on_a_server(tiny_model, tmp_path):
    """At one request in flight, a model's three draws are three rows of one batch (the
    server's batch size), not three denoisings one after another."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    extra = json.loads((model / "incontext.json").read_text()) if (model / "incontext.json").is_file() else {}
    (model / "incontext.json").write_text(json.dumps({**extra, "consensus": 3}))
    results = run_speed(str(model), 2, tmp_path / "out", steps=2, concurrency=(1,), skip_stock=True, skip_http=True, threads=1,
                        matmul_size=128, compile=False)
    exact = next(r for r in results["rows"] if r["name"] == "engine ×1")
    assert exact["mean_batch_size"] == 3
