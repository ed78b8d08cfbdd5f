"""`RunParams`: a run's parameters as intake resolved them (submission.prepare), stored as
`runs.params` and read, typed, by the dispatcher, the output stage, pricing and callbacks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from incontext.service.models import Run


class RunParams(BaseModel):
    """A run's resolved parameters, stored as `runs.params`: what the engine, the output
    stage, pricing and the callback read. Runs stored before a field existed read its default."""

    prompt: str
    seed: int  # drawn at intake, so a re-run after a restart makes the same images
    num_images: int
    guidance_scale: float
    num_inference_steps: int
    output_format: Literal["jpeg", "png"]
    sync_mode: bool = False
    width: int
    height: int
    # What the output keeps of the input (outputs.py); None: the input's own ratio.
    aspect_ratio: str | None = None
    preserve: Literal["auto", "off"] = "auto"
    return_mask: bool = False
    unit_price_micros: int
    # Reference images stored with the run besides the edited one (Storage.save_references),
    # in the order the client sent them.
    references: int = 0
    # A client's mask stored with the run (Storage.save_input_mask): outside it the output
    # keeps the input's pixels, whatever `preserve` says (preserve.preserve).
    mask: bool = False
    # A workflow's run (incontext/workflows.py): its id, and for logo-placement the box the
    # logo was allowed in ([x0, y0, x1, y1] at the input's size), reported in the output.
    workflow: str | None = None
    placement: list[int] | None = None
    # A workflow's second edit of the same input, run beside the first (workflows.Plan.select):
    # the model's mask of the thing named, which picks among the regions a removal changed.
    select_prompt: str | None = None
    # Multi-turn: the engine may reuse the parent's latents, which only identify the image
    # when the parent made exactly one.
    parent_request_id: str | None = None
    # The model as the client named it (`black-forest-labs/flux-kontext-pro`): Replicate's
    # `model` shows it; `runs.model_id` is the model's one id whatever the alias.
    requested_model_id: str | None = None
    # What the outputs' metadata names the model by (ModelPreset.weights_name); None, for
    # runs stored before it: the run's engine_model_id.
    model_name: str | None = None
    # How another surface wants the end told (callbacks.CALLBACK_STYLES); None: Runflow's envelope.
    callback_style: str | None = None
    webhook_secret: str | None = None  # BFL: the request's own signing secret
    webhook_events: list[str] | None = None  # Replicate: webhook_events_filter

    @classmethod
    def of(cls, run: Run) -> RunParams:
        return cls.model_validate(run.params)
