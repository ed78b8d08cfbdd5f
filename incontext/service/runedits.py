"""A run's edit on the engine: the EditRequest its stored params make (a workflow's second
edit beside it is workflows.edit_with_select's)."""

from __future__ import annotations

from incontext import workflows
from incontext.engine.protocol import EditRequest
from incontext.service.inputs import RunInput
from incontext.service.models import Run
from incontext.service.runparams import RunParams

# Previews per run for the event stream: enough to watch an edit form, few enough that runs
# nobody watches lose nothing (each is one small matmul and a PNG of the latent size).
PREVIEWS_PER_RUN = 4


def request_for(run: Run, params: RunParams, given: RunInput) -> EditRequest:
    """The run's edit, as its params were resolved at submission."""
    return EditRequest(
        request_id=run.id,
        model_id=run.engine_model_id,
        prompt=params.prompt,
        image=given.fitted,
        references=given.references,
        width=params.width,
        height=params.height,
        seed=params.seed,
        num_images=params.num_images,
        guidance_scale=params.guidance_scale,
        num_inference_steps=params.num_inference_steps,
        parent_request_id=params.parent_request_id,
        previews=PREVIEWS_PER_RUN,
        owner=run.api_key_id,
        render_context=params.preserve == "auto",
        true_cfg=params.workflow is None or workflows.WORKFLOWS[params.workflow].true_cfg,
    )
