"""Model ids → a directory and a preset (steps, guidance, their ranges, price, working resolution).

Hosted clients call `flux-pro/kontext` or `black-forest-labs/flux-pro/kontext`; both are
aliases of the default model unless configured otherwise. The open editors' published
weights (FLUX.2 [klein], Qwen-Image-Edit) have presets under the names hosted APIs give them
(`PUBLISHED`); one is registered only when its weights directory is configured
(`INCONTEXT_MODEL_DIRS=flux-2-klein-4b=/models/FLUX.2-klein-4B,…`), since nothing is
downloaded here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Literal

from incontext.errors import ModelError, ModelNotFound, UnknownModel
from incontext.models import licenses

BUNDLED_NANO_DIR = Path(__file__).resolve().parent.parent / "weights" / "nano"
DEFAULT_MODEL_ID = "incontext/nano"
# The first is the id runs of the model report (ModelPreset.run_model_id), whatever alias was
# sent; the others are what Runflow, Replicate and fal clients name the same model.
HOSTED_ALIASES = ("flux-pro/kontext", "black-forest-labs/flux-pro/kontext", "black-forest-labs/flux-kontext-pro", "fal-ai/flux-pro/kontext")
# The widest steps and guidance the run input accepts (service/schemas.py's KontextInput); a
# preset narrows them to what its model is meant for.
STEPS_RANGE = (1, 50)
GUIDANCE_RANGE = (1.0, 20.0)
MAX_CONSENSUS = 8  # draws per output (ModelPreset.consensus)
# What `guidance_scale` drives: FLUX.1 Kontext's distilled guidance embedding (one pass per
# step); true classifier-free guidance against an empty or negative prompt (a second row per
# step; 1 turns it off); or nothing, in step-distilled weights that take no guidance.
GuidanceKind = Literal["embedded", "true_cfg", "ignored"]


@dataclass(frozen=True)
class ModelPreset:
    id: str
    directory: Path
    num_inference_steps: int = 20
    guidance_scale: float = 3.5
    price_per_image: Decimal = Decimal("0.04")
    target_area: int = 128 * 128  # pixels of one output; sides snap to `multiple`
    multiple: int = 16
    max_sequence_length: int = 32  # text tokens; the 12B model uses 512
    aliases: tuple[str, ...] = ()
    description: str = ""
    license: licenses.License = licenses.UNKNOWN
    steps_range: tuple[int, int] = STEPS_RANGE  # inclusive
    guidance_range: tuple[float, float] = GUIDANCE_RANGE  # inclusive
    guidance_kind: GuidanceKind = "embedded"
    # Denoisings per output, whose per-element median the output is (sampler.merge_draws): a
    # small model's stray marks differ from draw to draw, the asked change does not.
    consensus: int = 1

    def __post_init__(self):
        # A preset whose own defaults it would refuse is a bad preset, not a bad request.
        (lo, hi), (glo, ghi) = self.steps_range, self.guidance_range
        if not (STEPS_RANGE[0] <= lo <= self.num_inference_steps <= hi <= STEPS_RANGE[1]):
            raise ModelError(f"model {self.id}: {self.num_inference_steps} steps by default is outside its range {lo}–{hi} "
                             f"(or the range is outside {STEPS_RANGE[0]}–{STEPS_RANGE[1]})")
        if not (GUIDANCE_RANGE[0] <= glo <= self.guidance_scale <= ghi <= GUIDANCE_RANGE[1]):
            raise ModelError(f"model {self.id}: guidance {self.guidance_scale} by default is outside its range {glo}–{ghi} "
                             f"(or the range is outside {GUIDANCE_RANGE[0]}–{GUIDANCE_RANGE[1]})")
        if not 1 <= self.consensus <= MAX_CONSENSUS:
            raise ModelError(f"model {self.id}: consensus {self.consensus} is outside 1–{MAX_CONSENSUS}")

    def out_of_range(self, num_inference_steps: int, guidance_scale: float) -> dict[str, str]:
        """{input field: why} for each value outside this model's ranges; empty when both fit."""
        wrong = {}
        (lo, hi), (glo, ghi) = self.steps_range, self.guidance_range
        if not lo <= num_inference_steps <= hi:
            wrong["num_inference_steps"] = f"{self.id} takes {lo} to {hi} steps, not {num_inference_steps}"
        if not glo <= guidance_scale <= ghi:
            wrong["guidance_scale"] = f"{self.id} takes guidance_scale {glo:g} to {ghi:g}, not {guidance_scale:g}"
        return wrong

    @property
    def weights_name(self) -> str:
        """What the model's outputs name it by (imageio.Provenance): its id, unless the id says
        nothing of the weights (a directory given as the model, or one served under the
        default id); then the directory's name, never its whole path, which would tell
        whoever gets the image where this machine keeps its files."""
        if self.id == str(self.directory) or (self.id == DEFAULT_MODEL_ID and self.directory != BUNDLED_NANO_DIR):
            return licenses.weights_name(self.directory)
        return self.id

    @property
    def run_model_id(self) -> str:
        """The `model_id` its runs report: one per model, so a client that filters or compares
        runs by it sees the same id whichever alias it called."""
        return self.aliases[0] if self.aliases else self.id

    def public(self) -> dict:
        d = asdict(self)
        d["directory"] = str(self.directory)
        d["price_per_image"] = str(self.price_per_image)
        d["steps_range"], d["guidance_range"] = list(self.steps_range), list(self.guidance_range)
        return d


# Published weights by the id hosted APIs give them (BFL's endpoint, fal's and Replicate's
# model names as aliases), with the defaults their model cards and the diffusers pipelines
# give. Their licences come from models/licenses.py by these names. Prices are this
# server's defaults per image at the working size; incontext.json in the directory may
# override any of these fields.
_KLEIN_DISTILLED = dict(
    # Step-distilled: the model card and Flux2KleinKVPipeline run 4 steps; the distilled
    # weights take no guidance (Flux2KleinPipeline ignores guidance_scale when is_distilled).
    num_inference_steps=4, steps_range=(1, 50), guidance_scale=1.0, guidance_kind="ignored",
    max_sequence_length=512, target_area=1024 * 1024, multiple=16,
)
_KLEIN_BASE = dict(
    # Undistilled: Flux2KleinPipeline's defaults, 50 steps and true CFG 4 against the empty prompt.
    num_inference_steps=50, steps_range=(1, 50), guidance_scale=4.0, guidance_range=(1.0, 20.0), guidance_kind="true_cfg",
    max_sequence_length=512, target_area=1024 * 1024, multiple=16,
)
_QWEN_EDIT = dict(
    # True CFG (the pipelines' true_cfg_scale, default 4) against a negative prompt; the
    # pipelines size outputs to about 1024² pixels in multiples of 32 (calculate_dimensions).
    guidance_scale=4.0, guidance_range=(1.0, 20.0), guidance_kind="true_cfg", steps_range=(2, 50),
    max_sequence_length=512, target_area=1024 * 1024, multiple=32, price_per_image=Decimal("0.03"),
)
PUBLISHED: dict[str, dict] = {
    "flux-2-klein-4b": dict(_KLEIN_DISTILLED, aliases=("black-forest-labs/flux-2-klein-4b",), price_per_image=Decimal("0.014"),
                            description="FLUX.2 [klein] 4B: step-distilled editing with up to 4 images, 4 steps"),
    "flux-2-klein-9b": dict(_KLEIN_DISTILLED, aliases=("black-forest-labs/flux-2-klein-9b",), price_per_image=Decimal("0.015"),
                            description="FLUX.2 [klein] 9B: step-distilled editing with up to 4 images, 4 steps"),
    "flux-2-klein-9b-kv": dict(_KLEIN_DISTILLED, price_per_image=Decimal("0.015"),
                               description="FLUX.2 [klein] 9B KV: the 9B with the reference images' attention keys and values "
                                           "computed once per request, 4 steps"),
    "flux-2-klein-base-4b": dict(_KLEIN_BASE, aliases=("black-forest-labs/flux-2-klein-base-4b",), price_per_image=Decimal("0.04"),
                                 description="FLUX.2 [klein] Base 4B: undistilled, true classifier-free guidance"),
    "flux-2-klein-base-9b": dict(_KLEIN_BASE, aliases=("black-forest-labs/flux-2-klein-base-9b",), price_per_image=Decimal("0.05"),
                                 description="FLUX.2 [klein] Base 9B: undistilled, true classifier-free guidance"),
    # Qwen-Image-Edit's model card and QwenImageEditPipeline: 50 steps.
    "qwen-image-edit": dict(_QWEN_EDIT, num_inference_steps=50, aliases=("fal-ai/qwen-image-edit", "qwen/qwen-image-edit"),
                            description="Qwen-Image-Edit: one image and an instruction, true classifier-free guidance"),
    # The 2509 and 2511 model cards run 40 steps (QwenImageEditPlusPipeline's own default is 50).
    "qwen-image-edit-plus": dict(_QWEN_EDIT, num_inference_steps=40, aliases=("fal-ai/qwen-image-edit-plus", "qwen/qwen-image-edit-plus"),
                                 description="Qwen-Image-Edit-Plus (2509/2511): up to 4 images, true classifier-free guidance"),
}


@dataclass
class Registry:
    models: dict[str, ModelPreset] = field(default_factory=dict)
    default_id: str = DEFAULT_MODEL_ID

    def add(self, preset: ModelPreset) -> None:
        self.models[preset.id] = preset

    def resolve(self, model_id: str | None) -> ModelPreset:
        """An id, an alias, or a directory path → its preset. Raises ModelNotFound. For local
        callers (CLI, engine): anything from a request goes through `registered`."""
        if model_id and (Path(model_id) / "model_index.json").is_file():
            return preset_for_directory(Path(model_id))
        try:
            return self.registered(model_id)
        except UnknownModel as exc:
            raise ModelNotFound(exc.message) from None

    def registered(self, model_id: str | None) -> ModelPreset:
        """A registered id or alias → its preset; never a path, so a URL cannot make the server
        load a directory. Raises UnknownModel (404 MODEL_NOT_FOUND)."""
        if not model_id:
            return self.models[self.default_id]
        model_id = model_id.strip("/")
        if model_id in self.models:
            return self.models[model_id]
        for preset in self.models.values():
            if model_id in preset.aliases:
                return preset
        known = ", ".join(sorted(self.ids()))
        raise UnknownModel(f"unknown model '{model_id}'; known models: {known}")

    def ids(self) -> list[str]:
        out = []
        for preset in self.models.values():
            out.append(preset.id)
            out.extend(preset.aliases)
        return out


def preset_for_directory(path: Path, **overrides) -> ModelPreset:
    """A preset for an arbitrary model directory; `incontext.json` beside model_index.json may set
    fields, its licence among them (models/licenses.py). A published id (`PUBLISHED`) starts
    from its published defaults; the directory's file still has the last word on its weights."""
    path = Path(path).resolve()
    fields: dict = {"id": str(path), "directory": path, **PUBLISHED.get(overrides.get("id", ""), {})}
    extra = path / "incontext.json"
    data: dict = {}
    if extra.is_file():
        data = json.loads(extra.read_text())
        for key in ("num_inference_steps", "guidance_scale", "target_area", "multiple", "max_sequence_length", "description",
                    "guidance_kind", "consensus"):
            if key in data:
                fields[key] = data[key]
        for key in ("steps_range", "guidance_range"):
            if key in data:
                fields[key] = tuple(data[key])
        if "price_per_image" in data:
            fields["price_per_image"] = Decimal(str(data["price_per_image"]))
    fields.update(overrides)
    if "license" not in fields:
        # A path id says nothing the directory's name does not; the hosted aliases name an API
        # this server answers like, not the weights behind it.
        names = [n for n in (fields["id"], *fields.get("aliases", ())) if n != str(path) and n not in HOSTED_ALIASES]
        fields["license"] = licenses.for_model(data, names, path)
    return ModelPreset(**fields)


def default_registry(model_dirs: Mapping[str, Path] | None = None, *, default_dir: Path | None = None) -> Registry:
    """The default model (the bundled nano, or `default_dir`: INCONTEXT_MODEL_DIR) with the
    hosted aliases, plus each configured directory under its id (INCONTEXT_MODEL_DIRS): a
    published id gets its published preset, any other id the directory's own."""
    reg = Registry()
    reg.add(preset_for_directory(default_dir or BUNDLED_NANO_DIR, id=DEFAULT_MODEL_ID, aliases=HOSTED_ALIASES))
    taken = set(reg.ids())
    for model_id, directory in (model_dirs or {}).items():
        preset = preset_for_directory(Path(directory), id=model_id)
        clash = taken & {preset.id, *preset.aliases}
        if clash:  # one name, two models: whichever won would surprise someone
            raise ModelError(f"model {model_id}: {', '.join(sorted(clash))} already names another model")
        taken |= {preset.id, *preset.aliases}
        reg.add(preset)
    return reg
