"""`incontext edit` and `incontext models` as a user runs them."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image, ImageDraw
from typer.testing import CliRunner

from incontext.cli import app

runner = CliRunner()


def shapes_png(path, size=(90, 60)):
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).ellipse((10, 10, 40, 40), fill="red")
    img.save(path)
    return path


def test_edit_writes_images_and_reports_the_seed(tiny_model, tmp_path):
    src = shapes_png(tmp_path / "in.png")
    out = tmp_path / "out.png"
    r = runner.invoke(app, ["edit", str(src), "make the red circle blue", "-o", str(out), "--model", str(tiny_model),
                            "--seed", "42", "--num-images", "2", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "seed: 42" in r.output
    a, b = Image.open(tmp_path / "out_0.png"), Image.open(tmp_path / "out_1.png")
    # preserve auto (the default): the outputs come back at the input's own size.
    assert a.size == b.size == (90, 60)
    assert "of pixels changed" in r.output
    # Marked as AI-generated, naming the model (by its directory's name, never its path).
    assert a.info["AI-Generated"] == "true" and a.info["Source"] == tiny_model.name
    assert f"AI-generated: edited by the model {tiny_model.name}" == a.info["Description"]
    assert "compositeWithTrainedAlgorithmicMedia" in a.info["XML:com.adobe.xmp"] and str(tiny_model) not in a.info["XML:com.adobe.xmp"]


def test_preserve_off_returns_the_models_raw_output_and_mask_out_writes_the_region(tiny_model, tmp_path):
    src = shapes_png(tmp_path / "in.png")
    out, mask = tmp_path / "out.png", tmp_path / "mask.png"
    r = runner.invoke(app, ["edit", str(src), "make the red circle blue", "-o", str(out), "--model", str(tiny_model),
                            "--seed", "1", "--steps", "2", "--preserve", "off", "--mask-out", str(mask)])
    assert r.exit_code == 0, r.output
    a = Image.open(out)
    # The tiny model works at 64×64-ish; a 3:2 input keeps its aspect ratio on multiples of 16.
    assert a.size[0] > a.size[1] and a.size[0] % 16 == 0 and a.size[1] % 16 == 0 and a.size != (90, 60)
    m = Image.open(mask)
    assert m.mode == "L" and m.size == a.size
    assert "trainedAlgorithmicMedia" in a.info["XML:com.adobe.xmp"] and "composite" not in a.info["XML:com.adobe.xmp"]  # all the model's
    assert "AI-Generated" not in m.info  # a mask is no picture of anything


def test_mask_keeps_the_inputs_pixels_outside_it_bit_for_bit(tiny_model, tmp_path):
    import numpy as np

    src = shapes_png(tmp_path / "in.png")
    allowed = Image.new("L", (90, 60), 0)
    ImageDraw.Draw(allowed).rectangle((0, 0, 44, 59), fill=255)  # the left half may change
    allowed.save(tmp_path / "allowed.png")
    out, region = tmp_path / "out.png", tmp_path / "region.png"
    # preserve off: the model's raw output wherever the mask allows, the input's elsewhere.
    r = runner.invoke(app, ["edit", str(src), "make the red circle blue", "-o", str(out), "--model", str(tiny_model), "--seed", "1",
                            "--steps", "2", "--preserve", "off", "--mask", str(tmp_path / "allowed.png"), "--mask-out", str(region)])
    assert r.exit_code == 0, r.output
    a, inp = np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(src).convert("RGB"))
    assert a.shape == inp.shape  # at the input's own size, so its pixels can be kept exactly
    assert np.array_equal(a[:, 45:], inp[:, 45:])
    assert not np.array_equal(a[:, :45], inp[:, :45])  # the model did redraw the half it may
    assert not np.asarray(Image.open(region))[:, 45:].any()


def test_an_all_black_mask_is_a_one_line_error(tiny_model, tmp_path):
    src = shapes_png(tmp_path / "in.png")
    Image.new("L", (90, 60), 0).save(tmp_path / "black.png")
    r = runner.invoke(app, ["edit", str(src), "make it blue", "-o", str(tmp_path / "o.png"), "--model", str(tiny_model),
                            "--steps", "2", "--mask", str(tmp_path / "black.png")])
    assert r.exit_code == 1
    assert "INVALID_MASK" in r.output and "--mask" in r.output and "black everywhere" in r.output


def test_an_unknown_preserve_mode_is_a_one_line_error(tiny_model, tmp_path):
    src = shapes_png(tmp_path / "in.png")
    r = runner.invoke(app, ["edit", str(src), "make it blue", "-o", str(tmp_path / "o.png"), "--model", str(tiny_model), "--preserve", "most"])
    assert r.exit_code == 1
    assert "INVALID_INPUT" in r.output and "--preserve" in r.output


def test_aspect_ratio_and_jpeg_output(tiny_model, tmp_path):
    src = shapes_png(tmp_path / "in.png")
    out = tmp_path / "out.jpg"
    r = runner.invoke(app, ["edit", str(src), "remove the circle", "-o", str(out), "--model", str(tiny_model), "--aspect-ratio", "9:16", "--steps", "1"])
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    assert img.format == "JPEG" and img.size[1] > img.size[0]
    exif = img.getexif()
    assert exif[0x010E] == f"AI-generated: edited by the model {tiny_model.name}" and exif[0x0131].startswith("incontext ")


def test_bad_image_is_a_one_line_error(tiny_model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    proc = subprocess.run([sys.executable, "-m", "incontext", "edit", str(bad), "make it blue", "-o", str(tmp_path / "o.png"), "--model", str(tiny_model)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "INVALID_IMAGE" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_arguments_fail_cleanly(tiny_model, tmp_path):
    src = shapes_png(tmp_path / "in.png")
    r = runner.invoke(app, ["edit", str(src), "x", "-o", str(tmp_path / "o.gif"), "--model", str(tiny_model)])
    assert r.exit_code != 0 and "UNSUPPORTED_FORMAT" in r.output
    r = runner.invoke(app, ["edit", str(src), "x", "-o", str(tmp_path / "o.png"), "--aspect-ratio", "5:4", "--model", str(tiny_model)])
    assert r.exit_code != 0 and "INVALID_INPUT" in r.output
    r = runner.invoke(app, ["edit", str(src), "x", "-o", str(tmp_path / "o.png"), "--model", "no-such-model"])
    assert r.exit_code != 0 and "MODEL_UNAVAILABLE" in r.output
    r = runner.invoke(app, ["edit", str(src), "x", "-o", str(tmp_path / "o.png"), "--num-images", "9"])
    assert r.exit_code != 0


def test_models_lists_the_default_and_its_aliases():
    r = runner.invoke(app, ["models"], terminal_width=250)
    assert r.exit_code == 0
    assert "incontext/nano" in r.output and "flux-pro/kontext" in r.output
    assert "license: Apache-2.0 (commercial use allowed)" in r.output  # the bundled weights are the project's own


def test_reference_images_change_the_edit_and_are_fitted_to_the_output(tiny_model, tmp_path):
    src = shapes_png(tmp_path / "in.png")
    ref = tmp_path / "ref.png"
    Image.new("RGB", (40, 100), "green").save(ref)  # another size and aspect: fitted to the edited image's output size
    common = ["--model", str(tiny_model), "--seed", "5", "--steps", "2", "--preserve", "off"]
    alone = runner.invoke(app, ["edit", str(src), "put the green thing in", "-o", str(tmp_path / "alone.png"), *common])
    both = runner.invoke(app, ["edit", str(src), "put the green thing in", "--reference", str(ref), "-o", str(tmp_path / "with_ref.png"), *common])
    assert alone.exit_code == 0 and both.exit_code == 0, alone.output + both.output
    a, b = Image.open(tmp_path / "alone.png"), Image.open(tmp_path / "with_ref.png")
    assert a.size == b.size and a.size[0] > a.size[1]  # the edited image decides the size
    assert a.tobytes() != b.tobytes()  # the same seed, another result: the model saw the reference

    r = runner.invoke(app, ["edit", str(src), "x", "-o", str(tmp_path / "o.png"), *common, *["--reference", str(ref)] * 4])
    assert r.exit_code == 1 and "INVALID_INPUT" in r.output and "--reference" in r.output


def test_edit_runs_every_model_family_here(tmp_path):
    """The CLI edits through the server's engine, so a FLUX.2 [klein] or Qwen-Image-Edit
    directory edits as the Kontext one does: with a reference image, at the input's size."""
    from incontext.testing import tiny_klein_dir, tiny_qwen_edit_dir

    src = shapes_png(tmp_path / "in.png")
    ref = shapes_png(tmp_path / "ref.png", size=(40, 40))
    for name, directory in (("klein", tiny_klein_dir(tmp_path / "klein")), ("qwen", tiny_qwen_edit_dir(tmp_path / "qwen"))):
        out = tmp_path / f"{name}.png"
        r = runner.invoke(app, ["edit", str(src), "make the red circle blue", "-o", str(out), "--model", str(directory),
                                "--reference", str(ref), "--seed", "3", "--steps", "2"])
        assert r.exit_code == 0, r.output
        assert Image.open(out).size == (90, 60)
        assert Image.open(out).info["Source"] == name
