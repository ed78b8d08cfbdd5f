"""Workflows on the runs API: `POST /v1/models/{workflow}/runs` for each of
incontext/workflows.py's ids, with the workflow's own input schema, and its card and spec
(`GET /v1/models/{workflow}`, `…/llms.txt`). Thin: the workflow plans one edit, which is
submitted as any run (submission.submit with the plan), and its results are added to the
run's output when it is stored (outputs.store → workflows.finish).

Included before routes/runs.py and discovery.py, whose `{model_id:path}` routes would
otherwise take these paths with a model's input schema.
"""

# No `from __future__ import annotations`: each route's body type is a class made in a loop,
# which FastAPI must see as an object, not a name to look up in this module.

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError, create_model

from incontext import workflows
from incontext.service import modelspec, submission
from incontext.service.deps import KeyDep, ServiceDep
from incontext.service.errors import ValidationFailed, field_error
from incontext.service import surfaces
from incontext.service.routes import bfl, fal
from incontext.service.routes.discovery import MarkdownResponse, ModelPublic
from incontext.service.schemas import CallbackUrl, KontextInput, RunCreate, RunPublic

router = APIRouter(prefix="/v1", tags=["workflows"])
# fal's apps by the workflows' ids (fal-ai/object-removal, …): included before routes/fal.py,
# whose {app:path} routes take a model's input.
fal_router = APIRouter(tags=["fal"], route_class=surfaces.route_class(bfl.render_error))

# Bounded in the document as store.check_idempotency_key bounds it.
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                              description="same key + same body replays the first response")]


def edit_input(plan: workflows.Plan, inp: workflows.WorkflowInput) -> KontextInput:
    """The planned edit as a run's input: the images in order (the edited one first), the
    mask, preserve, and the region always returned (the workflows report it)."""
    data = {
        "prompt": plan.prompt, "image_urls": list(plan.images), "preserve": plan.preserve, "return_mask": True,
        "output_format": inp.output_format, "sync_mode": inp.sync_mode, "seed": inp.seed, "num_inference_steps": inp.num_inference_steps,
    }
    if inp.guidance_scale is not None:  # absent: the model's default (submission.prepare)
        data["guidance_scale"] = inp.guidance_scale
    if plan.mask is not None:
        data["mask_image_url"] = plan.mask
    try:
        return KontextInput.model_validate(data)
    except ValidationError as exc:  # the workflow's own schema should have refused it first
        errors = [field_error("input." + ".".join(map(str, e["loc"])), e["msg"], e["type"]) for e in exc.errors()]
        raise ValidationFailed(f"invalid request: {errors[0]['message']}", errors=errors) from None


def error_names(plan: workflows.Plan, prefix: str = "input.") -> dict[str, str]:
    """The planned edit's field names → the workflow input's, so a 422 names what the client sent
    (image_urls.1 → input.reference_image_url; fal's bodies are the input itself: no prefix)."""
    names = {name: f"{prefix}{name}" for name in KontextInput.model_fields}
    names.update({f"image_urls.{i}": f"{prefix}{field}" for i, field in enumerate(plan.fields)})
    names["input"] = prefix.rstrip(".") or "body"
    return names


def _add_workflow(workflow: workflows.Workflow) -> None:
    body_type = create_model(f"{workflow.input.__name__.removesuffix('Input')}RunCreate", __base__=RunCreate, input=(workflow.input, ...))

    async def create_run(body: body_type, request: Request, key: KeyDep, service: ServiceDep, idempotency_key: IdempotencyKey = None):
        plan = workflow.plan(body.input)
        run_request = submission.RunRequest(
            model_id=workflow.id, items=[edit_input(plan, body.input)], surface=submission.RUNS_SURFACE, metadata=body.metadata,
            client_refs=[body.client_ref], callback=submission.Callback(body.callback_url) if body.callback_url else None,
            names=error_names(plan), plan=plan, echo=body.input.model_dump(mode="json", exclude_unset=True, by_alias=False),
            idempotency_key=idempotency_key, idempotency_body={"workflow": workflow.id, **body.model_dump(mode="json", exclude_unset=True)},
        )

        def render(session, runs, batch) -> dict:
            return RunPublic.from_row(runs[0], service.storage).model_dump(mode="json")

        accepted = await submission.submit(service, key, run_request, request_id=request.state.request_id, render=render)
        return JSONResponse(accepted.content, status_code=accepted.status_code, headers=accepted.headers)

    def get_workflow(service: ServiceDep):
        return modelspec.workflow_card(workflow, service.registry.registered(None), service.storage.base_url)

    def get_llms_txt(service: ServiceDep):
        return MarkdownResponse(modelspec.workflow_llms_txt(workflow, service.registry.registered(None), service.storage.base_url))

    def fal_request(values: workflows.WorkflowInput) -> dict:
        plan = workflow.plan(values)
        return {"item": edit_input(plan, values), "plan": plan, "names": error_names(plan, prefix=""),
                "echo": values.model_dump(mode="json", exclude_unset=True)}

    async def fal_run(request: Request, key: fal.FalKeyDep, service: ServiceDep, values: Annotated[workflow.input, Body()]):
        run = await fal._submit(workflow.id, request=request, key=key, service=service, **fal_request(values))
        return await fal.finished(run, workflow.id, service)

    async def fal_submit(
        request: Request, key: fal.FalKeyDep, service: ServiceDep, values: Annotated[workflow.input, Body()],
        fal_webhook: Annotated[CallbackUrl | None, Query(max_length=2048, description="POSTed the result when the request ends")] = None,
    ):
        run = await fal._submit(workflow.id, request=request, key=key, service=service, webhook=fal_webhook, **fal_request(values))
        return fal.queued(run, workflow.id, service.storage)

    create_run.__doc__ = f"Queue a {workflow.id} run (201, `queued`): {workflow.description}. Results: {workflow.results}."
    name = workflow.id.replace("-", "_")
    router.add_api_route(f"/models/{workflow.id}/runs", create_run, methods=["POST"], status_code=201, response_model=RunPublic,
                         name=f"create_{name}_run", summary=f"Create a {workflow.id} run")
    router.add_api_route(f"/models/{workflow.id}/llms.txt", get_llms_txt, methods=["GET"], response_class=MarkdownResponse,
                         name=f"{name}_llms_txt", summary=f"The {workflow.id} spec (markdown)", tags=["discovery"])
    router.add_api_route(f"/models/{workflow.id}", get_workflow, methods=["GET"], response_model=ModelPublic, response_model_exclude_none=True,
                         name=f"get_{name}", summary=f"The {workflow.id} workflow: inputs, price, results", tags=["discovery"])


    fal_router.add_api_route(f"/fal-ai/{workflow.id}", fal_run, methods=["POST"], name=f"fal_{name}_run",
                             summary=f"fal: run {workflow.id} and answer with the result")
    fal_router.add_api_route(f"/queue/fal-ai/{workflow.id}", fal_submit, methods=["POST"], name=f"fal_{name}_submit",
                             summary=f"fal: queue a {workflow.id} request")


for _workflow in workflows.WORKFLOWS.values():
    _add_workflow(_workflow)
