"""The quality benchmark: a model, "return the input unchanged" and the ground truth, scored
on the fixed held-out set by the programmatic checks.

    incontext bench quality                                  # the bundled nano model, 20 per family
    incontext bench quality --model ./my-model --n 10 --out results/quick

Each row is an editor, a function (example, input image) → output image, run over:
1. single edits: success rate, PSNR to the target and preservation PSNR, per family;
2. multi-turn sequences: each edit applied to the editor's previous output; preservation PSNR
   (to the original image, outside the union of the edit masks so far) after turn 1 and after
   the last turn, and the drift between them.
PSNRs over several images are the dB of their mean squared error, so a few perfect images do
not make a mean infinite. Where the held-out set has workflow families (`--families workflows`:
removal, a background from a second image, an emblem, a mask), each row also carries their
exact-mask figures (bench/workflows.py). An example's second image reaches the model as a
request's references do (`EditRequest.references`, `sampler.denoise(references=…)`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from incontext import preserve, sampler, selector
from incontext.bench import checks, heldout, workflows
from incontext.bench.report import write_report
from incontext.engine.caches import image_key
from incontext.errors import InvalidInput
from incontext.workflows import WORKFLOWS, Drawn
from incontext.world import edits
from incontext.world.edits import Example

log = logging.getLogger(__name__)

IDENTITY = "input unchanged"
GROUND_TRUTH = "ground truth"
AUTOENCODER = "autoencoder (target round trip)"
AUTOENCODER_PRESERVED = "autoencoder, preserve auto"
DEFAULT_OUT = Path("results/quality")
MAX_DRIFT_SCENES = 10

Editor = Callable[[Example, Image.Image], Image.Image]


@dataclass
class Outputs:
    """What one editor produced: per family, an output and a verdict per held-out example."""

    images: dict[str, list[Image.Image]] = field(default_factory=dict)
    verdicts: dict[str, list[checks.Verdict | None]] = field(default_factory=dict)
    turns: list[list[Image.Image]] = field(default_factory=list)  # per drift sequence, output after each turn


# ---------------------------------------------------------------- editors


def edit_seed(seed: int, example: Example) -> int:
    """The noise seed of one held-out edit: `seed` plus a hash of the example (its family,
    instruction and the held-out input of its turn), so an edit draws the same noise whichever
    families run and in whatever order, and every editor of a run draws it for the same turn."""
    h = hashlib.blake2b(f"{example.family}\0{example.instruction}\0{image_key(example.context)}".encode(), digest_size=4)
    return seed + int.from_bytes(h.digest(), "big") % 2**31


def identity_editor(example: Example, image: Image.Image) -> Image.Image:
    return image


def ground_truth_editor(example: Example, image: Image.Image) -> Image.Image:
    return example.target


@dataclass
class ModelEditor:
    """The sampler on a loaded model, then preservation (`preserve` "auto" or "off").

    Each edit's seed is `edit_seed(seed, example)`, so every run draws the same noise. Editors that share a
    `memo` share the denoising of identical calls (same instruction, input and seed): the
    "auto" and "off" rows then differ only by preservation, at the cost of one model run."""

    models: sampler.Models
    steps: int
    guidance: float
    seed: int = 0
    preserve: str = "auto"
    consensus: int = 1  # draws per output (sampler.merge_draws), as the engine makes them
    memo: dict = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)  # per denoised (not memoised) edit
    region: str = "latents"  # where the edit happened: one of REGIONS
    true_cfg: bool = True  # the model's true CFG, where it declares one (off for the workflows that turn it off)

    def __call__(self, example: Example, image: Image.Image) -> Image.Image:
        references = _references(example)
        key = (example.instruction, image_key(image), *map(image_key, references), self.true_cfg, edit_seed(self.seed, example))
        start = time.perf_counter()
        if key not in self.memo:
            latents, img_cond = sampler.denoise(self.models, image, example.instruction, seeds=[key[-1]], num_steps=self.steps,
                                                guidance=self.guidance, references=references, consensus=self.consensus,
                                                true_cfg=self.true_cfg)
            raw = sampler.decode(self.models, latents, image.height, image.width)[0]
            rendered = sampler.decode(self.models, img_cond, image.height, image.width)[0]
            self.memo[key] = (raw, sampler.change_map(latents, img_cond, image.height, image.width, self.models.vae_scale_factor)[0], rendered)
            self.seconds.append(time.perf_counter() - start)
        raw, change, rendered = self.memo[key]
        config = preserve.RegionConfig()
        if self.region != "latents":
            if ("contrast", key) not in self.memo:
                self.memo["contrast", key] = sampler.contrast_map(self.models, image, example.instruction, seed=key[-1],
                                                                  guidance=self.guidance, references=references)
            change, config = contrast_region(change, self.memo["contrast", key], self.region)
        return preserve.preserve(raw, change, context=image, mode=self.preserve, rendered=rendered, config=config).image


# Where an edit happened, as the benchmark can take it (issue 14 asked to measure DiffEdit's
# contrast against the latents' distance): "latents", the engine's (`sampler.change_map`);
# "contrast", DiffEdit's mask (`sampler.contrast_map` over half its maximum); "both", the
# latents that moved and lie within one latent pixel of that mask.
REGIONS = ("latents", "contrast", "both")
CONTRAST_MASK = 0.5  # DiffEdit's binarisation of its normalised map


def contrast_region(change: np.ndarray, contrast: np.ndarray, region: str) -> tuple[np.ndarray, preserve.RegionConfig]:
    """The change map and region config that make `preserve` take `region`'s edit region."""
    marked = contrast > CONTRAST_MASK
    if region == "contrast":
        # The mask itself as a change map: 1 where marked, with no global rule (its maximum is 1 by construction).
        return marked.astype(np.float32), preserve.RegionConfig(threshold=0.5, global_median=math.inf)
    grown = preserve.dilate(marked, 1)
    return np.where(grown, change, 0.0).astype(np.float32), preserve.RegionConfig()


@dataclass
class AutoencoderEditor:
    """The target through the model's autoencoder (encode → decode): the best any output of
    this model can be where it redraws pixels, so a family that fails here is capped.

    With `preserve` "auto", that round trip is preserved as a model's output would be (its
    change map from the target's latents against the input's): a model that drew every edit
    right, as served. A family this row fails where the plain round trip passes is one that
    preservation blocks. Editors that share a `memo` share each target's round trip."""

    models: sampler.Models
    preserve: str | None = None
    memo: dict = field(default_factory=dict)

    def __call__(self, example: Example, image: Image.Image) -> Image.Image:
        w, h = example.target.size
        key = image_key(example.target)
        with torch.no_grad():
            if key not in self.memo:
                latents = sampler.encode_images(self.models, [example.target])
                self.memo[key] = (latents, sampler.decode(self.models, latents, h, w)[0])
            latents, raw = self.memo[key]
            if self.preserve is None:
                return raw
            context = sampler.encode_images(self.models, [image])
            change = sampler.change_map(latents, context, h, w, self.models.vae_scale_factor)[0]
            rendered = sampler.decode(self.models, context, h, w)[0]
        return preserve.preserve(raw, change, context=image, mode=self.preserve, rendered=rendered).image


@dataclass
class EngineEditor:
    """The engine (engine/local.py) with its cache of output latents, then preservation: a
    turn whose input is the previous turn's raw output starts from that output's latents,
    not from a decode → 8-bit image → encode round trip. Seeds are ModelEditor's."""

    engine: object  # a started LocalEngine
    model_id: str
    steps: int
    guidance: float
    seed: int = 0
    preserve: str = "auto"
    consensus: int | None = None  # None: the preset's
    calls: int = 0

    def __call__(self, example: Example, image: Image.Image) -> Image.Image:
        from incontext.engine.protocol import EditRequest

        request = EditRequest(f"quality-{self.calls}", self.model_id, example.instruction, image, image.width, image.height,
                              edit_seed(self.seed, example), guidance_scale=self.guidance, num_inference_steps=self.steps,
                              consensus=self.consensus, references=_references(example))
        self.calls += 1
        result = self.engine.submit(request).result()
        return preserve.preserve(result.images[0], result.change_maps[0], context=image, mode=self.preserve,
                                 rendered=result.rendered_context).image


@dataclass
class MaskDrawer:
    """A workflow's mask request as the engine answers it (EditRequest.thing_mask): the model's
    selector where it ships one and the input is a drawing, else the model's own drawing."""

    models: sampler.Models
    draw: Callable[[Example, Image.Image], Image.Image]

    def __call__(self, example: Example, image: Image.Image) -> Drawn:
        with torch.no_grad():
            picked = selector.draw(self.models, example.instruction, image)
        return Drawn(picked, picked=True) if picked is not None else Drawn(self.draw(example, image))


def _references(example: Example) -> tuple[Image.Image, ...]:
    """The example's second image, as a request's references: world references are drawn at
    the context's size, which is what the sampler and the engine expect."""
    return () if example.reference is None else (example.reference,)


def drift_on_cached_latents(preset, models: sampler.Models, sequences: list[list[Example]], *, steps: int, guidance: float,
                            seed: int, preserve_mode: str = "off", consensus: int | None = None) -> dict:
    """The drift score of the same turns (same seeds) run through the engine with its output-latent cache."""
    from incontext.engine.local import LocalEngine
    from incontext.models.registry import Registry

    registry = Registry(default_id=preset.id)
    registry.add(preset)
    engine = LocalEngine(registry, dtype=models.dtype, reuse_output_latents=True)
    engine.models[preset.id] = models
    engine.start_thread()
    try:
        turns = run_turns(EngineEditor(engine, preset.id, steps, guidance, seed, preserve_mode, consensus), sequences)
    finally:
        engine.stop()
        engine.join(30)
    return drift_scores(sequences, turns)


# ---------------------------------------------------------------- scoring


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _rate(verdicts: list[checks.Verdict | None], answer: str) -> float | None:
    """The share of scored verdicts whose `answer` (success, changed, kept) is yes."""
    scored = [getattr(v, answer) for v in verdicts if v is not None]
    return sum(scored) / len(scored) if scored else None


def _verdict(example: Example, output: Image.Image) -> checks.Verdict | None:
    """None for a family the checks do not know yet: it is scored by PSNR only."""
    return checks.verdict(example, output) if example.family in checks.CHECKS else None


def _score(examples: list[Example], outputs: list[Image.Image], verdicts: list[checks.Verdict | None]) -> dict:
    return {
        "n": len(examples),
        "success": _rate(verdicts, "success"),
        "changed": _rate(verdicts, "changed"),  # the requested change happened
        "kept": _rate(verdicts, "kept"),  # the rest was preserved
        "psnr": checks.db(_mean([checks.mse(out, ex.target) for ex, out in zip(examples, outputs)])),
        "preservation_psnr": checks.db(_mean([checks.mse(out, ex.context, ~ex.mask) for ex, out in zip(examples, outputs)])),
    }


def run_single(editor: Editor, heldout_set: dict[str, list[Example]], on_edit: Callable[[], None] | None = None) -> Outputs:
    out = Outputs()
    for family, examples in heldout_set.items():
        out.images[family] = []
        for ex in examples:
            out.images[family].append(editor(ex, ex.context))
            if on_edit is not None:
                on_edit()
        out.verdicts[family] = [_verdict(ex, o) for ex, o in zip(examples, out.images[family])]
    return out


def run_turns(editor: Editor, sequences: list[list[Example]], on_edit: Callable[[], None] | None = None) -> list[list[Image.Image]]:
    """Per sequence, the editor's output after each turn; each turn's input is the previous output."""
    results = []
    for sequence in sequences:
        image, outputs = sequence[0].context, []
        for ex in sequence:
            image = editor(ex, image)
            outputs.append(image)
            if on_edit is not None:
                on_edit()
        results.append(outputs)
    return results


def drift_scores(sequences: list[list[Example]], turn_outputs: list[list[Image.Image]]) -> dict:
    """Preservation PSNR after each turn (outside every edit mask so far, to the original image)."""
    by_turn = []
    for t in range(len(sequences[0]) if sequences else 0):
        errors = []
        for sequence, outputs in zip(sequences, turn_outputs):
            touched = np.logical_or.reduce([ex.mask for ex in sequence[: t + 1]])
            errors.append(checks.mse(outputs[t], sequence[0].context, ~touched))
        by_turn.append(checks.db(_mean(errors)))
    first, last = (by_turn[0], by_turn[-1]) if by_turn else (math.nan, math.nan)
    drift = 0.0 if first == last else first - last  # inf − inf would be nan: no drift
    return {"scenes": len(sequences), "turns": len(by_turn), "preservation_psnr_by_turn": by_turn,
            "turn_1": first, "turn_last": last, "drift_db": drift}


def score_row(name: str, editor: Editor, heldout_set: dict[str, list[Example]], sequences: list[list[Example]],
              on_edit: Callable[[], None] | None = None, *, workflows_too: bool = True) -> tuple[dict, Outputs]:
    """One row's figures. `workflows_too`: with a segment family, the editor also makes the
    segmentation workflow's own edits (bench/workflows.py), and bgref's and emblem's outputs
    are scored as the background-replace and logo-placement workflows return them too; all run
    with preserve auto, so a row of raw outputs leaves them out."""
    outputs = run_single(editor, heldout_set, on_edit)
    outputs.turns = run_turns(editor, sequences, on_edit)
    families = {f: _score(examples, outputs.images[f], outputs.verdicts[f]) for f, examples in heldout_set.items()}
    every = [ex for examples in heldout_set.values() for ex in examples]
    every_output = [o for f in heldout_set for o in outputs.images[f]]
    every_verdict = [v for f in heldout_set for v in outputs.verdicts[f]]
    row = {
        "name": name,
        "families": families,
        "all": _score(every, every_output, every_verdict),
        "drift": drift_scores(sequences, outputs.turns),
        "seconds_per_edit": None,
    }
    runs, edits_of = {}, {}
    if workflows_too:  # each workflow's removal, and beside it its mask request (the model's selector or drawing, preserve off)
        raw = replace(editor, preserve="off") if isinstance(editor, (ModelEditor, AutoencoderEditor)) else editor
        drawer = MaskDrawer(editor.models, raw) if isinstance(editor, ModelEditor) else (lambda ex, image: Drawn(raw(ex, image)))
        served = {f: as_served(editor, f) for f in workflows.WORKFLOW_OF if heldout_set.get(f)}
        runs = {f: [workflows.workflow_output(ex, served[f](workflows.workflow_example(ex), ex.context),
                                              drawer(workflows.select_example(ex), ex.context)) for ex in heldout_set[f]]
                for f in workflows.RUN_BY_WORKFLOW if f in served}
        # A workflow that samples otherwise than a plain edit (its own true CFG setting) makes its own edits.
        edits_of = {f: [served[f](ex, ex.context) for ex in heldout_set[f]]
                    for f in workflows.WORKFLOW_OUTPUTS if f in served and served[f] is not editor}
    scores = workflows.workflow_scores(heldout_set, outputs.images, outputs.verdicts, runs, workflows_too, edits_of)
    if scores:
        row["workflows"] = scores
    return row, outputs


def as_served(editor: Editor, family: str) -> Editor:
    """The editor as the workflow of a workflow `family` runs its edit: a model without true CFG
    where the workflow turns it off (workflows.Workflow.true_cfg)."""
    served = WORKFLOWS[workflows.WORKFLOW_OF[family]].true_cfg
    return replace(editor, true_cfg=False) if isinstance(editor, ModelEditor) and editor.true_cfg and not served else editor


# ---------------------------------------------------------------- the benchmark


def select_families(spec: str) -> tuple[str, ...]:
    """"all", "basic" (recolor, remove, add, move, background, grayscale) or a comma list."""
    try:
        return edits.select_families(spec)
    except ValueError as e:
        raise InvalidInput(str(e)) from None


def run_quality(
    model_id_or_dir: str | None,
    n_per_family: int = 20,
    out_dir: Path = DEFAULT_OUT,
    turns: int = 5,
    steps: int | None = None,
    guidance: float | None = None,
    dtype: str = "auto",
    *,
    drift_scenes: int | None = None,
    families: str = "all",
    seed: int = 0,
    consensus: int | None = None,
    regions: tuple[str, ...] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score the model, the identity and the ground truth; write report.md, results.json and
    grid_<family>.png under `out_dir`; return the results (as in results.json). Each of `regions`
    (REGIONS but "latents") adds a row: the same denoisings preserved by that edit region."""
    from incontext.models.device import resolve_dtype
    from incontext.models.loader import load_model
    from incontext.models.registry import default_registry, preset_for_directory

    if n_per_family < 1 or turns < 1:
        raise InvalidInput(f"need at least one example per family and one turn (got n={n_per_family}, turns={turns})")
    try:
        resolve_dtype(dtype)
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    chosen = select_families(families)
    if unknown := [r for r in regions if r not in REGIONS]:
        raise InvalidInput(f"unknown regions {unknown}; known: {', '.join(REGIONS)}")

    # 1. the model: resolve and load before drawing the held-out set, so a bad id fails fast
    if model_id_or_dir and (Path(model_id_or_dir) / "model_index.json").is_file():
        preset = preset_for_directory(Path(model_id_or_dir))  # resolve() strips the "/" of an absolute path
    else:
        preset = default_registry().resolve(model_id_or_dir)
    steps = steps or preset.num_inference_steps
    guidance = guidance if guidance is not None else preset.guidance_scale
    consensus = consensus or preset.consensus
    models = load_model(preset.directory, dtype=dtype, max_sequence_length=preset.max_sequence_length)

    # 2. the held-out set
    heldout_set = heldout.heldout_set(n_per_family, only=chosen)
    sequences = heldout.heldout_sequences(drift_scenes if drift_scenes is not None else min(n_per_family, MAX_DRIFT_SCENES), turns)

    # 3. the model row, reporting progress per edit
    total = (2 + len(regions)) * (n_per_family * len(heldout_set) + len(sequences) * turns)
    done = 0

    def on_edit() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    # The product's default (preserve auto) and the model's raw output, from one denoising
    # of each single edit (the turns diverge after the first).
    editor = ModelEditor(models, steps, guidance, seed, preserve="auto", consensus=consensus)
    model_row, model_outputs = score_row(preset.id, editor, heldout_set, sequences, on_edit)
    raw_editor = ModelEditor(models, steps, guidance, seed, preserve="off", consensus=consensus, memo=editor.memo)
    raw_row, raw_outputs = score_row(f"{preset.id}, preserve off", raw_editor, heldout_set, sequences, on_edit, workflows_too=False)
    model_row["seconds_per_edit"] = float(np.mean(editor.seconds))
    region_rows = [score_row(f"{preset.id}, region by {r}", replace(editor, region=r, seconds=[]), heldout_set, sequences, on_edit,
                             workflows_too=False)[0] for r in regions if r != "latents"]
    # the same turns with the engine's latent reuse; ModelEditor ran them after every single edit
    reuse = drift_on_cached_latents(preset, models, sequences, steps=steps, guidance=guidance, seed=seed, consensus=consensus)

    # 4. the reference rows: the autoencoder's ceiling, and two with no model
    round_trip = AutoencoderEditor(models)
    autoencoder_row, _ = score_row(AUTOENCODER, round_trip, heldout_set, [], workflows_too=False)
    preserved_row, _ = score_row(AUTOENCODER_PRESERVED, AutoencoderEditor(models, "auto", round_trip.memo), heldout_set, [])
    identity_row, _ = score_row(IDENTITY, identity_editor, heldout_set, sequences)
    truth_row, truth_outputs = score_row(GROUND_TRUTH, ground_truth_editor, heldout_set, sequences)

    # 5. the report
    results = {
        "model": preset.id,
        "directory": str(preset.directory),
        "steps": steps,
        "guidance": guidance,
        "consensus": consensus,
        "dtype": dtype,
        "seed": seed,
        "n_per_family": n_per_family,
        "held_out_seed": heldout.HELD_OUT_SEED,
        "families": list(heldout_set),
        "rows": [model_row, raw_row, *region_rows, autoencoder_row, preserved_row, identity_row, truth_row],
        "drift_rows": [{"name": f"{preset.id}, preserve off, on cached latents", "drift": reuse}],
    }
    write_report(results, Path(out_dir), heldout_set, sequences, model_outputs, truth_outputs, raw_outputs)
    log.info("quality report written to %s", out_dir)
    return results
