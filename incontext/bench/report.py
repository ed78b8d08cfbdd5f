"""The quality benchmark's outputs: report.md, results.json and image grids.

Tables are built once as (headers, rows of strings), so the markdown report and the CLI's
rich table show the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from incontext.bench.checks import PRESERVE_MIN_DB, Verdict
from incontext.world.edits import Example

if TYPE_CHECKING:
    from incontext.bench.quality import Outputs

GRID_ROWS = 8  # examples per family grid
GRID_SEQUENCES = 4  # multi-turn sequences in the drift grid
PAD = 4
CAPTION = 14  # pixels of text above each grid row
GRID_BACKGROUND = (255, 255, 255)
CELL_BACKGROUND = (235, 235, 235)


# ---------------------------------------------------------------- numbers


def fmt_db(value: float) -> str:
    if math.isnan(value):
        return "–"
    return "∞" if math.isinf(value) else f"{value:.1f}"


def fmt_rate(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One line per row: success per family and overall, PSNRs, drift and speed."""
    turns = results["rows"][0]["drift"]["turns"]
    headers = ["row", *results["families"], "all", "PSNR dB", "preserved dB", "turn 1 dB", f"turn {turns} dB", "drift dB", "s/edit"]
    lines = []
    for row in results["rows"]:
        drift, every = row["drift"], row["all"]
        seconds = row["seconds_per_edit"]
        lines.append([
            row["name"],
            *(fmt_rate(row["families"][f]["success"]) for f in results["families"]),
            fmt_rate(every["success"]),
            fmt_db(every["psnr"]),
            fmt_db(every["preservation_psnr"]),
            fmt_db(drift["turn_1"]),
            fmt_db(drift["turn_last"]),
            fmt_db(drift["drift_db"]),
            "–" if seconds is None else f"{seconds:.2f}",
        ])
    return headers, lines


def family_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One line per family and row: success and its two halves (change made, rest kept), PSNR
    to the target, preservation PSNR."""
    headers = ["family", "row", "n", "success", "change made", "rest kept", "PSNR dB", "preserved dB"]
    lines = []
    for family in results["families"]:
        for row in results["rows"]:
            s = row["families"][family]
            lines.append([
                family, row["name"], str(s["n"]), fmt_rate(s["success"]), fmt_rate(s.get("changed")), fmt_rate(s.get("kept")),
                fmt_db(s["psnr"]), fmt_db(s["preservation_psnr"]),
            ])
    return headers, lines


def drift_table(results: dict) -> tuple[list[str], list[list[str]]]:
    turns = results["rows"][0]["drift"]["turns"]
    headers = ["row", *(f"turn {t + 1} dB" for t in range(turns)), "drift dB"]
    rows = [*results["rows"][:1], *results.get("drift_rows", []), *results["rows"][1:]]
    lines = [[row["name"], *map(fmt_db, row["drift"]["preservation_psnr_by_turn"]), fmt_db(row["drift"]["drift_db"])]
             for row in rows if row["drift"]["turns"]]
    return headers, lines


WORKFLOW_LINES = {"remove": ", the object-removal workflow, as a user calls it",
                  "bgref": ", the background-replace workflow: only the input's backdrop may change",
                  "emblem": ", the logo-placement workflow: the logo laid in a box at the place"}


def workflow_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One line per workflow family and row: success, the family's own exact-mask figure, and
    the subject kept (PSNR to the input outside the change; share at the 40 dB goal)."""
    headers = ["family", "row", "n", "success", "figure", "value", "kept dB", "kept ≥ 40 dB"]
    names = {"fill_psnr": "removed object filled, dB", "background_psnr": "background taken, dB", "box_psnr": "emblem in its box, dB",
             "iou": "mask IoU"}
    lines = []
    for family in results["families"]:
        for row in results["rows"]:
            s = row.get("workflows", {}).get(family)
            if s is None:
                continue
            figure = next(k for k in names if k in s)
            value = f"{s[figure]:.2f}" if figure == "iou" else fmt_db(s[figure])
            lines.append([family, row["name"], str(s["n"]), fmt_rate(s["success"]), names[figure], value,
                          fmt_db(s["kept_psnr"]) if "kept_psnr" in s else "–", fmt_rate(s.get("kept_at_goal"))])
            if "workflow_iou" in s:  # the segmentation workflow's own mask (bench/workflows.py)
                lines.append([family, row["name"] + ", the workflow's mask, as a user gets it", str(s["n"]), "–",
                              "mask IoU (share ≥ 0.9)", f"{s['workflow_iou']:.2f} ({fmt_rate(s['workflow_at_goal'])})", "–", "–"])
            if "workflow_value" in s:  # the background-replace or logo-placement workflow's output (bench/workflows.py)
                lines.append([family, row["name"] + WORKFLOW_LINES[family], str(s["n"]), fmt_rate(s["workflow_success"]), names[figure],
                              fmt_db(s["workflow_value"]), fmt_db(s["workflow_kept_psnr"]), fmt_rate(s["workflow_kept_at_goal"])])
    return headers, lines


def markdown_table(headers: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return "\n".join(out)


def markdown(results: dict) -> str:
    drift = results["rows"][0]["drift"]
    grids = "\n".join(f"![{f}](grid_{f}.png)" for f in results["families"])
    return f"""# Quality benchmark

Model `{results["model"]}` ({results["directory"]}): {results["steps"]} steps, guidance {results["guidance"]}, consensus {results.get("consensus", 1)}, {results["dtype"]}, seed {results["seed"]}.
{results["n_per_family"]} held-out examples per family (seed {results["held_out_seed"]}, never used in training).

- **success**: the requested change happened, by the programmatic checks of `incontext/bench/checks.py`,
  and what the edit should not touch is preserved (≥ {PRESERVE_MIN_DB:.0f} dB; for a family that repaints
  every pixel, the whole image that close to the target). Per family, **change made** and **rest kept**
  are the two halves on their own: which of them holds a family back.
- **PSNR**: to the ground-truth target; **preserved**: to the input, outside the edit mask.
  Over several images, the dB of their mean squared error.
- **drift**: {drift["scenes"]} scenes edited {drift["turns"]} times in a row, each edit applied to the previous output;
  preservation PSNR (to the original, outside every edit mask so far) after turn 1 minus after turn {drift["turns"]}.
  The row "on cached latents" runs the same turns through the engine, whose next turn starts from
  the previous output's latents instead of its decoded 8-bit image (same seeds).
- **rows**: the model as served (`preserve` auto: the input's own pixels outside the region its
  latents moved, `incontext/preserve.py`), the same denoising with `preserve` off (the model's raw
  output), and the **autoencoder** row: each target encoded and decoded, the ceiling of any pixel
  the model redraws. A family whose autoencoder row fails its own check caps that family's success.
  **autoencoder, preserve auto**: that round trip preserved as a served output is (its change map
  from the target's latents): a model that drew every edit right. A family it fails where the
  round trip passes is one preservation blocks.
- **s/edit**: mean wall time of one edit of the model.

## Summary

{markdown_table(*summary_table(results))}

## Per family

{markdown_table(*family_table(results))}

{_workflow_section(results)}## Multi-turn drift

{markdown_table(*drift_table(results))}

![multi-turn](grid_multiturn.png)

## Examples (input | {results["model"]} | its raw output, preserve off | target)

{grids}
"""


def _workflow_section(results: dict) -> str:
    if not any("workflows" in row for row in results["rows"]):
        return ""
    return f"""## Workflows

Exact-mask figures (`incontext/bench/workflows.py`): the removed object's pixels against what was
behind it, the background against the second image's, the emblem's box against the target's, the
output split at mid-grey against the object's mask (IoU: the model asked for a mask in the held-out
words), the segmentation workflow's own mask as a user gets it (it removes the object named by its
colour and kind and asks for a mask of it beside that: where the model's selector picks the thing
among the input's segments, the mask is the thing's outline on the input and the removal changes
nothing off it; where the model draws the mask, the mask is the removed regions the drawing
picks), the object-removal workflow's output made the same way, the logo-placement workflow's
output as a user gets it who marks the place with a box (the model's edit in the box, the logo's own
pixels laid in it), and the background-replace workflow's (the edit kept on the input's backdrop only);
**kept**: PSNR to the input outside the change.

{markdown_table(*workflow_table(results))}

"""


def jsonable(value):
    """Results with non-finite floats spelled out: "inf" for a perfect PSNR, null for no pixels."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


# ---------------------------------------------------------------- grids


def grid(rows: list[list[Image.Image | None]], captions: list[str], columns: list[str] | None = None) -> Image.Image:
    """Images in rows of cells as large as the largest image, each row under its caption,
    under a line of column titles if given."""
    cell_w = max(img.width for row in rows for img in row if img is not None)
    cell_h = max(img.height for row in rows for img in row if img is not None)
    n_columns = max(len(row) for row in rows)
    head = CAPTION if columns else 0
    width = PAD + n_columns * (cell_w + PAD)
    height = PAD + head + len(rows) * (CAPTION + cell_h + PAD)
    canvas = Image.new("RGB", (width, height), GRID_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(columns or []):
        draw.text((PAD + c * (cell_w + PAD), PAD), title, fill=(90, 90, 90), font=font)
    for r, (row, caption) in enumerate(zip(rows, captions)):
        top = PAD + head + r * (CAPTION + cell_h + PAD)
        draw.text((PAD, top), caption, fill=(0, 0, 0), font=font)
        for c, img in enumerate(row):
            left = PAD + c * (cell_w + PAD)
            draw.rectangle((left, top + CAPTION, left + cell_w - 1, top + CAPTION + cell_h - 1), fill=CELL_BACKGROUND)
            if img is not None:
                canvas.paste(img.convert("RGB"), (left + (cell_w - img.width) // 2, top + CAPTION + (cell_h - img.height) // 2))
    return canvas


def family_grid(examples: list[Example], outputs: list[Image.Image], verdicts: list[Verdict | None], model: str,
                raw: list[Image.Image] | None = None) -> Image.Image:
    """input | second image, where the family has one | the model's output (preserve auto) |
    its raw output (preserve off) | target."""
    rows, captions = [], []
    second = any(ex.reference is not None for ex in examples)
    for i, (ex, out, v) in enumerate(list(zip(examples, outputs, verdicts))[:GRID_ROWS]):
        rows.append([ex.context, *([ex.reference] if second else []), out, *([raw[i]] if raw else []), ex.target])
        captions.append(f"{ex.instruction}  [{_verdict_caption(v)}]")
    name = Path(model).name or model
    return grid(rows, captions, ["input", *(["second image"] if second else []), name, *(["preserve off"] if raw else []), "target"])


def _verdict_caption(v: Verdict | None) -> str:
    if v is None:
        return "-"
    if v.success:
        return "ok"
    return "FAIL: " + " and ".join(why for why, bad in (("no change", not v.changed), ("rest not kept", not v.kept)) if bad)


def multiturn_grid(sequences: list[list[Example]], model_turns: list[list[Image.Image]], truth_turns: list[list[Image.Image]]) -> Image.Image:
    rows, captions = [], []
    for k, (sequence, model, truth) in enumerate(list(zip(sequences, model_turns, truth_turns))[:GRID_SEQUENCES]):
        steps = " / ".join(f"{t + 1}. {ex.instruction}" for t, ex in enumerate(sequence))
        rows += [[sequence[0].context, *model], [None, *truth]]
        captions += [f"scene {k + 1}, model: {steps}", "ground truth"]
    turns = len(sequences[0])
    return grid(rows, captions, ["input", *(f"turn {t + 1}" for t in range(turns))])


# ---------------------------------------------------------------- files


def write_report(results: dict, out_dir: Path, heldout_set: dict[str, list[Example]], sequences: list[list[Example]],
                 model_outputs: Outputs, truth_outputs: Outputs, raw_outputs: Outputs | None = None) -> None:
    """report.md, results.json, grid_<family>.png and grid_multiturn.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown(results))
    (out_dir / "results.json").write_text(json.dumps(jsonable(results), indent=2) + "\n")
    for family, examples in heldout_set.items():
        raw = raw_outputs.images[family] if raw_outputs is not None else None
        family_grid(examples, model_outputs.images[family], model_outputs.verdicts[family], results["model"], raw).save(out_dir / f"grid_{family}.png")
    if sequences:
        multiturn_grid(sequences, model_outputs.turns, truth_outputs.turns).save(out_dir / "grid_multiturn.png")
