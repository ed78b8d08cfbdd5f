"""Model ids → a directory and a preset (steps, guidance, price, working resolution).

Hosted clients call `flux-pro/kontext` or `black-forest-labs/flux-pro/kontext`; both are
aliases of the default model unless configured otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path

from incontext.errors import ModelNotFound, UnknownModel
from incontext.models import licenses

BUNDLED_NANO_DIR = Path(__file__).resolve().parent.parent / "weights" / "nano"
DEFAULT_MODEL_ID = "incontext/nano"
# The first is the id runs of the model report (ModelPreset.run_model_id), whatever alias was
# sent; the others are what Runflow, Replicate and fal clients name the same model.
HOSTED_ALIASES = ("flux-pro/kontext", "black-forest-labs/flux-pro/kontext", "black-forest-labs/flux-kontext-pro", "fal-ai/flux-pro/kontext")


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
        return d


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
    fields, its licence among them (models/licenses.py)."""
    path = Path(path).resolve()
    fields: dict = {"id": str(path), "directory": path}
    extra = path / "incontext.json"
    data: dict = {}
    if extra.is_file():
        data = json.loads(extra.read_text())
        for key in ("num_inference_steps", "guidance_scale", "target_area", "multiple", "max_sequence_length", "description"):
            if key in data:
                fields[key] = data[key]
        if "price_per_image" in data:
            fields["price_per_image"] = Decimal(str(data["price_per_image"]))
    fields.update(overrides)
    if "license" not in fields:
        # A path id says nothing the directory's name does not; the hosted aliases name an API
        # this server answers like, not the weights behind it.
        names = [n for n in (fields["id"], *fields.get("aliases", ())) if n != str(path) and n not in HOSTED_ALIASES]
        fields["license"] = licenses.for_model(data, names, path)
    return ModelPreset(**fields)


def default_registry(extra_dirs: dict[str, Path] | None = None) -> Registry:
    """The bundled nano model as default (with the hosted aliases), plus configured directories."""
    reg = Registry()
    reg.add(preset_for_directory(BUNDLED_NANO_DIR, id=DEFAULT_MODEL_ID, aliases=HOSTED_ALIASES))
    for model_id, directory in (extra_dirs or {}).items():
        reg.add(preset_for_directory(Path(directory), id=model_id))
    return reg
