"""Workflows on every surface whose input shapes allow, for each of incontext/workflows.py's
ids, with the workflow's own input schema:

    POST /v1/models/{workflow}/runs                          the runs API (and its card and spec:
    POST /v1/models/{workflow}/batches                         GET /v1/models/{workflow}, …/llms.txt)
    POST /v1/{workflow}                                      BFL's (poll GET /v1/get_result)
    POST /v1/models/incontext/{workflow}/predictions         Replicate's
    POST /fal-ai/{workflow}, POST /queue/fal-ai/{workflow}   fal's

Thin: the workflow plans one edit per input (`planned`), which is submitted as any run
(submission.submit with the plan) and answered by the surface's own code; its results are
added to the run's output when it is stored (outputs.store → workflows.finish). BFL and
Replicate name the fields their way (bfl.WORKFLOW_FIELDS, replicate.WORKFLOW_FIELDS):
`surface_input` renames the workflow's schema, `surface_values` reads it back.

Included before routes/runs.py, batches.py, replicate.py and discovery.py, whose
`{model_id:path}` and `{owner}/{name}` routes would otherwise take these paths with a model's
input schema.
"""

# No `from __future__ import annotations`: each route's body type is a class made in a loop,
# which FastAPI must see as an object, not a name to look up in this module.

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, Field, ValidationError, create_model

from incontext import workflows
from incontext.service import modelspec, submission
from incontext.service.deps import KeyDep, ServiceDep
from incontext.service.errors import ValidationFailed, field_error
from incontext.service import surfaces
from incontext.service.routes import batches, bfl, fal, replicate
from incontext.service.routes.discovery import MarkdownResponse, ModelPublic
from incontext.service.schemas import BatchCreate, BatchPublic, CallbackUrl, KontextInput, RunCreate, RunPublic

router = APIRouter(prefix="/v1", tags=["workflows"])
# fal's apps by the workflows' ids (fal-ai/object-removal, …): included before routes/fal.py,
# whose {app:path} routes take a model's input.
fal_router = APIRouter(tags=["fal"], route_class=surfaces.route_class(bfl.render_error))
# BFL's and Replicate's routes live on `router` (included early) but answer errors their surface's way.
BFL_ROUTE = surfaces.route_class(bfl.render_error)
REPLICATE_ROUTE = surfaces.route_class(replicate.render_error)

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


def error_names(plan: workflows.Plan, prefix: str = "input.", surface: dict[str, str] | None = None) -> dict[str, str]:
    """The planned edit's field names → the workflow input's, so a 422 names what the client sent
    (image_urls.1 → input.reference_image_url; fal's and BFL's bodies are the input itself: no
    prefix), through `surface`'s names for the workflow's fields (reference_image_url → reference_image)."""
    surface = surface or {}
    names = {name: prefix + surface.get(name, name) for name in KontextInput.model_fields}
    names.update({f"image_urls.{i}": prefix + surface.get(field, field) for i, field in enumerate(plan.fields)})
    names["input"] = prefix.rstrip(".") or "body"
    return names


@dataclass
class Planned:
    """One workflow input, planned: the edit submitted as a run, its plan, the names its errors
    give back, and the input as sent, which the run echoes."""

    item: KontextInput
    plan: workflows.Plan
    names: dict[str, str]
    echo: dict

    def request(self, **fields) -> submission.RunRequest:
        return submission.RunRequest(items=[self.item], plan=self.plan, names=self.names, echo=self.echo, **fields)


def planned(workflow: workflows.Workflow, values: workflows.WorkflowInput, prefix: str = "input.",
            surface: dict[str, str] | None = None) -> Planned:
    plan = workflow.plan(values)
    echo = values.model_dump(mode="json", exclude_unset=True, exclude={"client_ref"})  # a batch item's client_ref is the run's own
    return Planned(edit_input(plan, values), plan, error_names(plan, prefix, surface), echo)


# Other surfaces' names for the workflows' fields. What each image is, for their schemas:
IMAGE_ROLES = {
    "image_url": "the image",
    "reference_image_url": "the image whose background replaces the input's",
    "logo_image_url": "the logo",
    "mask_image_url": "where the logo may go: white may change, black keeps the input's pixels bit for bit; absent, the "
    "flattest free spot (reported as placement)",
}


def surface_input(workflow: workflows.Workflow, fields: dict[str, str], *, base: type[BaseModel], images: str, name: str,
                  also: dict[str, tuple[str, ...]] | None = None) -> type[BaseModel]:
    """The workflow's input schema under a surface's names (`fields`: ours → theirs; a field not
    named there is not offered), with the same types, bounds and defaults; `also`: other
    spellings read for a name; `images`: how the surface takes an image."""
    definitions = {}
    for ours, info in workflow.input.model_fields.items():
        if (theirs := fields.get(ours)) is None:
            continue
        choices = (also or {}).get(theirs)
        description = f"{IMAGE_ROLES[ours]} ({images})" if ours in IMAGE_ROLES else info.description
        if choices:
            description += f"; also read as {', '.join(choices)}"
        definitions[theirs] = (
            Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation,
            Field(... if info.is_required() else info.default, validation_alias=AliasChoices(theirs, *choices) if choices else None,
                  description=description),
        )
    return create_model(name, __base__=base, **definitions)


def surface_values(workflow: workflows.Workflow, body: BaseModel, fields: dict[str, str],
                   image: Callable[[str], str] | None = None) -> workflows.WorkflowInput:
    """The workflow's input from a body of surface_input's model (images through `image`)."""
    given = body.model_dump(exclude_unset=True)
    data = {ours: given[theirs] for ours, theirs in fields.items() if theirs in given}
    if image is not None:
        data = {k: image(v) if k in IMAGE_ROLES and isinstance(v, str) else v for k, v in data.items()}
    try:
        return workflow.input.model_validate(data)
    except ValidationError as exc:  # the surface's schema should have refused it first
        errors = [field_error(fields.get(str(e["loc"][0]), str(e["loc"][0])), e["msg"], e["type"]) for e in exc.errors()]
        raise ValidationFailed(f"invalid request: {errors[0]['message']}", errors=errors) from None


def _add_workflow(workflow: workflows.Workflow) -> None:
    model_name = workflow.input.__name__.removesuffix("Input")
    body_type = create_model(f"{model_name}RunCreate", __base__=RunCreate, input=(workflow.input, ...))

    async def create_run(body: body_type, request: Request, key: KeyDep, service: ServiceDep, idempotency_key: IdempotencyKey = None):
        run_request = planned(workflow, body.input).request(
            model_id=workflow.id, surface=submission.RUNS_SURFACE, metadata=body.metadata,
            client_refs=[body.client_ref], callback=submission.Callback(body.callback_url) if body.callback_url else None,
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
        run = planned(workflow, values, prefix="")
        return {"item": run.item, "plan": run.plan, "names": run.names, "echo": run.echo}

    async def fal_run(request: Request, key: fal.FalKeyDep, service: ServiceDep, values: Annotated[workflow.input, Body()]):
        run = await fal._submit(workflow.id, request=request, key=key, service=service, **fal_request(values))
        return await fal.finished(run, workflow.id, service)

    async def fal_submit(
        request: Request, key: fal.FalKeyDep, service: ServiceDep, values: Annotated[workflow.input, Body()],
        fal_webhook: Annotated[CallbackUrl | None, Query(max_length=2048, description="POSTed the result when the request ends")] = None,
    ):
        run = await fal._submit(workflow.id, request=request, key=key, service=service, webhook=fal_webhook, **fal_request(values))
        return fal.queued(run, workflow.id, service.storage)

    # A batch: each item the workflow's input (and a client_ref), each planned on its own.
    item_type = create_model(f"{model_name}BatchItem", __base__=workflow.input, client_ref=(str | None, Field(None, max_length=255)))
    batch_type = create_model(f"{model_name}BatchCreate", __base__=BatchCreate, input=(list[item_type], Field(min_length=1, max_length=100)))

    async def create_batch(body: batch_type, request: Request, key: KeyDep, service: ServiceDep, idempotency_key: IdempotencyKey = None):
        runs = [planned(workflow, item, prefix=f"input.{i}.") for i, item in enumerate(body.input)]
        # submission looks a batch item's field up as "3.image_urls.1" (input. taken off), the item itself as "3".
        names = {(f"{i}.{ours}" if ours != "input" else str(i)): theirs for i, run in enumerate(runs) for ours, theirs in run.names.items()}
        run_request = submission.RunRequest(
            model_id=workflow.id, items=[run.item for run in runs], surface=submission.BATCHES_SURFACE, batch=True,
            metadata=body.metadata, client_refs=[item.client_ref for item in body.input],
            callback=submission.Callback(body.callback_url) if body.callback_url else None,
            names=names, plans=[run.plan for run in runs], echoes=[run.echo for run in runs],
            idempotency_key=idempotency_key, idempotency_body={"workflow": workflow.id, **body.model_dump(mode="json", exclude_unset=True)},
        )
        return await batches.accept(run_request, request, key, service)

    # BFL's: the fields in the body, under BFL's names; poll GET /v1/get_result.
    bfl_body = surface_input(workflow, bfl.WORKFLOW_FIELDS, base=bfl.WorkflowRequest, images=bfl.WORKFLOW_IMAGES,
                             also=bfl.WORKFLOW_ALSO, name=f"Bfl{model_name}Request")

    async def bfl_create(body: bfl_body, request: Request, key: bfl.BflKeyDep, service: ServiceDep):
        values = surface_values(workflow, body, bfl.WORKFLOW_FIELDS, image=surfaces.image_reference)
        run_request = planned(workflow, values, prefix="", surface=bfl.WORKFLOW_FIELDS).request(
            model_id=workflow.id, surface=f"POST /v1/{workflow.id}", callback=bfl.webhook(body))
        return await bfl.submitted(run_request, request, key, service)

    # Replicate's: the fields in `input`, under Replicate's names, as the model incontext/<workflow>.
    replicate_input = surface_input(workflow, replicate.WORKFLOW_FIELDS, base=replicate.WorkflowPredictionInput,
                                    images=replicate.WORKFLOW_IMAGES, name=f"{model_name}PredictionInput")
    replicate_body = create_model(f"{model_name}PredictionCreate", __base__=replicate.PredictionCreate, input=(replicate_input, ...))
    replicate_model = f"{replicate.WORKFLOW_OWNER}/{workflow.id}"

    async def replicate_create(body: replicate_body, request: Request, key: replicate.ReplicateKeyDep, service: ServiceDep,
                               prefer: replicate.PreferWait = None):
        values = surface_values(workflow, body.input, replicate.WORKFLOW_FIELDS)
        run_request = planned(workflow, values, surface=replicate.WORKFLOW_FIELDS).request(
            model_id=replicate_model, surface=f"POST /v1/models/{replicate_model}/predictions", callback=body.callback())
        return await replicate.answer(run_request, request, key, service, prefer)

    create_run.__doc__ = f"Queue a {workflow.id} run (201, `queued`): {workflow.description}. Results: {workflow.results}."
    create_batch.__doc__ = (f"Queue a batch of {workflow.id} runs (201): each item is the workflow's input (and `client_ref`); one bad "
                            f"item refuses the batch with a 422 naming it (`input.3.image_url`). Results, per run: {workflow.results}.")
    bfl_create.__doc__ = (f"BFL-style: queue a {workflow.id} run; poll `polling_url` (GET /v1/get_result) until `Ready`: `result.sample`, "
                          "`result.mask`, `result.boxes` (and logo-placement's `result.placement`).")
    replicate_create.__doc__ = (f"Replicate-style: a prediction of {replicate_model}; its `output` is `{{image, mask, boxes}}` "
                                "(and logo-placement's `placement`).")
    name = workflow.id.replace("-", "_")
    router.add_api_route(f"/models/{workflow.id}/runs", create_run, methods=["POST"], status_code=201, response_model=RunPublic,
                         name=f"create_{name}_run", summary=f"Create a {workflow.id} run")
    router.add_api_route(f"/models/{workflow.id}/llms.txt", get_llms_txt, methods=["GET"], response_class=MarkdownResponse,
                         name=f"{name}_llms_txt", summary=f"The {workflow.id} spec (markdown)", tags=["discovery"])
    router.add_api_route(f"/models/{workflow.id}", get_workflow, methods=["GET"], response_model=ModelPublic, response_model_exclude_none=True,
                         name=f"get_{name}", summary=f"The {workflow.id} workflow: inputs, price, results", tags=["discovery"])
    router.add_api_route(f"/models/{workflow.id}/batches", create_batch, methods=["POST"], status_code=201, response_model=BatchPublic,
                         name=f"create_{name}_batch", summary=f"Create a batch of {workflow.id} runs", tags=["batches"])
    router.add_api_route(f"/{workflow.id}", bfl_create, methods=["POST"], response_model=bfl.Submitted, route_class_override=BFL_ROUTE,
                         responses={401: {"description": '`{"detail": "..."}`'}}, name=f"bfl_{name}", summary=f"BFL: queue a {workflow.id} run",
                         tags=["bfl"])
    router.add_api_route(f"/models/{replicate_model}/predictions", replicate_create, methods=["POST"], status_code=201,
                         route_class_override=REPLICATE_ROUTE, name=f"replicate_{name}_prediction",
                         summary=f"Replicate: create a {replicate_model} prediction", tags=["replicate"])

    fal_router.add_api_route(f"/fal-ai/{workflow.id}", fal_run, methods=["POST"], name=f"fal_{name}_run",
                             summary=f"fal: run {workflow.id} and answer with the result")
    fal_router.add_api_route(f"/queue/fal-ai/{workflow.id}", fal_submit, methods=["POST"], name=f"fal_{name}_submit",
                             summary=f"fal: queue a {workflow.id} request")


for _workflow in workflows.WORKFLOWS.values():
    _add_workflow(_workflow)
