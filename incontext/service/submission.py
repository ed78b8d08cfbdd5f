"""Run intake, once for every surface: a surface translates its client's request into a
`RunRequest` and calls `submit`, which does the rest in one order:

    validate the model → count images (rate limit) → replay an Idempotency-Key → fetch
    image URLs (event loop) → check the key's active images → decode and fit each image →
    store runs (and a batch) with typed `RunParams` → claim → commit → hand the inputs over

A surface (routes/runs.py, batches.py, bfl.py, openai.py, replicate.py, fal.py) then only
renders the stored runs in its own shape.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from incontext import imageio, workflows
from incontext.errors import IncontextError
from incontext.models.registry import ModelPreset
from incontext.service import callbacks, contentfilter, lifecycle, store
from incontext.service.errors import RateLimited, ServiceError, ValidationFailed, at_field, field_error
from incontext.service.inputs import MaskImage, RunInput, SourceImage, load_mask, load_source, output_size, prefetch
from incontext.service.models import ApiKey, Batch, Run
from incontext.service.runparams import RunParams
from incontext.service.schemas import KontextInput
from incontext.service.storage import Storage
from incontext.settings import Settings

_DATA_URI_HEAD = re.compile(r"^(data:[^,]{0,100}),", re.IGNORECASE)


RUNS_SURFACE = "POST /v1/models/{model_id}/runs"
BATCHES_SURFACE = "POST /v1/models/{model_id}/batches"
PRIMARY_SURFACES = (RUNS_SURFACE, BATCHES_SURFACE)


@dataclass
class Callback:
    """Where and how a surface's client hears that its run ended."""

    url: str
    style: str | None = None  # None: Runflow's envelope, signed with the key's callback secrets
    secret: str | None = None
    events: list[str] | None = None


@dataclass
class RunRequest:
    """One surface's request, translated: one run, or a batch of runs of one model."""

    model_id: str  # as the client named it; only registered ids and aliases resolve
    items: list[KontextInput]
    surface: str  # "POST /v1/flux-kontext-pro": logged on the run
    batch: bool = False  # a Batch row groups the runs (POST …/batches)
    metadata: dict | None = None
    client_refs: list[str | None] = field(default_factory=list)
    callback: Callback | None = None
    # Our input names → the client's (image_url → input_image), for error messages; None
    # keeps Runflow's `input.image_url` (`input.3.image_url` in a batch).
    names: dict[str, str] | None = None
    # Idempotency: the same key and body replay the first answer (Runflow routes only).
    idempotency_key: str | None = None
    idempotency_body: Any = None
    # A workflow's run (routes/workflows.py): the edit its input planned, on the default model,
    # and the input as the client sent it, which the run echoes instead of the planned edit's.
    # A batch of a workflow gives one of each per item instead (plans, echoes).
    plan: workflows.Plan | None = None
    echo: dict | None = None
    plans: list[workflows.Plan] | None = None
    echoes: list[dict] | None = None

    def planned(self, i: int) -> tuple[workflows.Plan | None, dict | None]:
        """Item `i`'s workflow plan and echo (None, None: an ordinary edit)."""
        if self.plans is not None:
            return self.plans[i], self.echoes[i] if self.echoes is not None else None
        return self.plan, self.echo


@dataclass
class Accepted:
    runs: list[Run]  # detached rows, as committed; empty for a replay
    batch: Batch | None
    content: dict | None  # the answer `render` built (or the replayed one)
    status_code: int
    headers: dict[str, str]  # rate-limit headers (and Idempotent-Replayed)


Render = Callable[[Session, list[Run], Batch | None], dict]


async def submit(service, key: ApiKey, request: RunRequest, *, request_id: str | None, render: Render | None = None) -> Accepted:
    """Queue the request's runs and start them. `render` builds the answer inside the
    transaction (so an Idempotency-Key remembers exactly it). Raises IncontextError: unknown
    model (404), rate limit (429), validation (422, fields named as the client sent them),
    Idempotency-Key reused with another body (409)."""
    from incontext.service.deps import count_images  # deps imports this module's neighbours

    # A workflow runs on the default model; its own id is what its runs report.
    preset = service.registry.registered(None if request.planned(0)[0] else request.model_id)
    limits = count_images(service, key, sum(item.num_images for item in request.items))
    digest = None
    if request.idempotency_key is not None:
        store.check_idempotency_key(request.idempotency_key)
        digest = store.request_hash(f"{request.surface} {preset.id}", request.idempotency_body)
        replay = await run_in_threadpool(_replay, service, key.id, request.idempotency_key, digest, limits)
        if replay is not None:
            return replay
    # On the event loop: a slow image host never holds a thread the reads need.
    urls = [url for i in request.items for url in (*i.images, *([i.mask_image_url] if i.mask_image_url else []))]
    remote = await prefetch(urls, outbound=service.outbound, storage=service.storage, settings=service.settings)
    return await run_in_threadpool(_store, service, key, request, preset, request_id, digest, limits, remote, render)


def _replay(service, api_key_id: str, key: str, digest: str, limits: dict) -> Accepted | None:
    with service.sessions() as session:
        record = store.replay(session, api_key_id, key, digest)
        if record is None:
            return None
        return Accepted([], None, record.response, record.status_code, {**limits, "Idempotent-Replayed": "true"})


def _store(service, key: ApiKey, request: RunRequest, preset: ModelPreset, request_id, digest, limits, remote, render) -> Accepted:
    with service.sessions() as session:
        # 1. Validate every item before anything is stored: one bad item refuses the request.
        try:
            check_active_images(session, key.id, sum(i.num_images for i in request.items), service.settings)
            prepared = [
                prepare(
                    item, field="input" if not request.batch else f"input.{i}", preset=preset, api_key_id=key.id,
                    session=session, storage=service.storage, settings=service.settings, remote=remote,
                    plan=plan, echo=echo,
                )
                for i, item in enumerate(request.items)
                for plan, echo in [request.planned(i)]
            ]
        except IncontextError as exc:
            raise renamed(exc, request.names) if request.names is not None else exc from None

        # 2. Store the runs (and their batch), with the model as named and how the end is told.
        callback = request.callback
        for p in prepared:
            p.params.requested_model_id = request.model_id.strip("/")
            if callback is not None:
                p.params.callback_style, p.params.webhook_secret, p.params.webhook_events = callback.style, callback.secret, callback.events
        batch = None
        if request.batch:
            plan = request.planned(0)[0]  # a workflow's batch is listed under the workflow's id, as its runs are
            batch = Batch(api_key_id=key.id, model_id=plan.workflow if plan else preset.run_model_id, meta=request.metadata,
                          callback_url=callback.url if callback else None)
            session.add(batch)
            session.flush()
        runs, told = [], False
        for i, p in enumerate(prepared):
            run = queue(
                session, service.storage, p, batch_id=batch.id if batch else None,
                client_ref=request.client_refs[i] if i < len(request.client_refs) else None,
                meta=None if request.batch else request.metadata,
                callback_url=callback.url if callback and not request.batch else None, request_id=request_id,
            )
            if request.surface not in PRIMARY_SURFACES:  # a run of another surface says so in its log
                lifecycle.add_log(session, run.id, f"received through {request.surface}")
            told |= callbacks.enqueue_event(session, run, "start", service.storage) is not None  # Replicate's, when asked for
            runs.append(run)
        content = render(session, runs, batch) if render else None

        # 3. Commit, claimed in the same transaction so that one commit starts them.
        if digest:
            store.remember(session, key.id, request.idempotency_key, digest, 201, content)
        inputs = {run.id: p.run_input for run, p in zip(runs, prepared)}
        claimed = service.dispatcher.claim_within(session, inputs)
        try:
            session.commit()
        except Exception as exc:
            session.rollback()
            for run_id in inputs:
                service.storage.delete_input(run_id)
            # The same Idempotency-Key won a race in another request: answer as it did.
            if isinstance(exc, IntegrityError) and digest:
                if replay := _replay(service, key.id, request.idempotency_key, digest, limits):
                    return replay
            raise
    service.dispatcher.submitted(inputs, claimed)
    if told:
        service.sender.wake()
    return Accepted(runs, batch, content, 201, limits)


@dataclass
class PreparedRun:
    fields: dict[str, Any]  # columns for lifecycle.create_run, but params
    params: RunParams
    input_bytes: bytes  # stored, so a restart can run it again
    run_input: RunInput  # decoded, and fitted to the output size: what the dispatcher hands on
    reference_bytes: list[bytes] = field(default_factory=list)  # stored beside input_bytes, in order
    mask_bytes: bytes | None = None  # the client's mask as received, stored beside them


def check_ranges(item: KontextInput, preset: ModelPreset, field: str) -> None:
    """The model's own steps and guidance ranges (inside the schema's, which every model
    shares): a value outside them is the same 422 VALIDATION_ERROR as one outside the schema,
    naming the field, before any image is decoded."""
    steps = item.num_inference_steps or preset.num_inference_steps
    guidance = item.guidance_scale if "guidance_scale" in item.model_fields_set else preset.guidance_scale
    wrong = preset.out_of_range(steps, guidance)
    if wrong:
        errors = [field_error(f"{field}.{name}", why, "out_of_model_range") for name, why in wrong.items()]
        raise ValidationFailed(f"invalid request: {'; '.join(wrong.values())}", errors=errors)


def prepare(
    item: KontextInput,
    *,
    field: str,
    preset: ModelPreset,
    api_key_id: str,
    session: Session,
    storage: Storage,
    settings: Settings,
    remote: Mapping[str, bytes | IncontextError] | None = None,
    plan: workflows.Plan | None = None,
    echo: dict | None = None,
) -> PreparedRun:
    """Validate the images and the mask (http(s) ones already fetched into `remote` by
    inputs.prefetch); raises IncontextError pinned to `field`.image_url (or
    `field`.image_urls.<i>, `field`.mask_image_url) etc. `plan`: a workflow's edit, run as
    the workflow's model id at its price (`echo`: its input as sent)."""
    check_ranges(item, preset, field)
    # Every image passes the same checks; the first is edited and decides the output's size.
    names = [f"{field}.image_url"] if item.image_urls is None else [f"{field}.image_urls.{i}" for i in range(len(item.images))]

    def load(i: int) -> SourceImage:
        try:
            return load_source(item.images[i], api_key_id=api_key_id, session=session, storage=storage, settings=settings, remote=remote)
        except IncontextError as exc:
            raise at_field(exc, names[i]) from None

    source = load(0)
    try:
        width, height = output_size(source.image, item.aspect_ratio, preset)
    except IncontextError as exc:
        raise at_field(exc, f"{field}.aspect_ratio") from None
    # Each reference is fitted as soon as it is decoded: a request holds one large decode at
    # a time besides the edited image, as a request with one image does.
    references, reference_sizes = [], []
    for i in range(1, len(item.images)):
        reference = load(i)
        reference_sizes.append(reference.image.size)
        references.append(SourceImage(reference.data, imageio.fit_to_size(reference.image, width, height), reference.parent_run_id))
    mask = None
    if item.mask_image_url is not None:
        try:
            mask = load_mask(item.mask_image_url, source.image.size, api_key_id=api_key_id, session=session, storage=storage, settings=settings, remote=remote)
        except IncontextError as exc:
            raise at_field(exc, f"{field}.mask_image_url") from None
    prompt, placement = item.prompt, None
    if plan is not None and plan.place:
        # Where the logo goes: the client's mask's bounding box, or a spot picked here, on the
        # decoded image, and then the mask (stored with the run like a client's: a restart honours it).
        if mask is not None:
            placement = workflows.mask_box(mask.image)
        else:
            placement = workflows.placement(source.image, reference_sizes[0])
            image = workflows.box_mask(source.image.size, placement)
            mask = MaskImage(data=imageio.encode_image(image, "png"), image=image)
        prompt = prompt.replace("{position}", workflows.position_name(placement, source.image.size))
    if plan is not None and plan.backdrop and (backdrop := workflows.backdrop_mask(source.image)) is not None:
        # The edit may change only the backdrop, stored as the run's mask as a client's is.
        mask = MaskImage(data=imageio.encode_image(backdrop, "png"), image=backdrop)
    try:
        images = (source.image, *(r.image for r in references))
        contentfilter.check(settings.content_filter, contentfilter.ContentCheck("input", preset.id, prompt, images))
    except IncontextError as exc:
        raise at_field(exc, field) from None

    given = item.model_fields_set
    price = workflows.WORKFLOWS[plan.workflow].price_per_image if plan else preset.price_per_image
    params = RunParams(
        prompt=prompt,
        seed=item.seed if item.seed is not None else secrets.randbelow(2**32),
        num_images=item.num_images,
        guidance_scale=item.guidance_scale if "guidance_scale" in given else preset.guidance_scale,
        num_inference_steps=item.num_inference_steps or preset.num_inference_steps,
        output_format=item.output_format,
        sync_mode=item.sync_mode,
        width=width,
        height=height,
        aspect_ratio=item.aspect_ratio,
        preserve=item.preserve,
        return_mask=item.return_mask,
        unit_price_micros=int(price * 1_000_000),
        references=len(references),
        mask=mask is not None,
        model_name=preset.weights_name,
        parent_request_id=_single_output_parent(session, source.parent_run_id),
        workflow=plan.workflow if plan else None,
        placement=placement,
        select_prompt=plan.select if plan else None,
    )
    if echo is None:
        echo = item.model_dump(mode="json", include=given - {"client_ref"})
    echo = {k: _abbreviated(v) if k.endswith(("_url", "_urls")) else v for k, v in echo.items()}
    fields = {
        "api_key_id": api_key_id,
        "model_id": plan.workflow if plan else preset.run_model_id,
        "engine_model_id": preset.id,
        "input": echo,
        "num_images": item.num_images,
        "parent_run_id": source.parent_run_id,
    }
    # Fitted here, in the request's thread, so the dispatcher hands it to the engine as it is.
    run_input = RunInput.fit(source.image, width, height, [r.image for r in references], mask=mask.image if mask else None)
    return PreparedRun(fields=fields, params=params, input_bytes=source.data, run_input=run_input, reference_bytes=[r.data for r in references],
                       mask_bytes=mask.data if mask else None)


# What a refusal for too many active images tells the client to wait: about the time the
# engine takes for a few batched images on a small machine; the client may retry sooner.
ACTIVE_IMAGES_RETRY_S = 5


def check_active_images(session: Session, api_key_id: str, images: int, settings: Settings) -> None:
    """Refuse (429, Retry-After) a create that would take the key past its cap of queued and
    running images. One request over the whole cap is let through when nothing is active,
    so no batch is refused forever."""
    cap = settings.max_active_images_per_key
    active = lifecycle.active_images(session, api_key_id)
    if active and active + images > cap:
        raise RateLimited(
            f"this key has {active} images queued or running and may have {cap}; retry when some have finished",
            headers={"Retry-After": str(ACTIVE_IMAGES_RETRY_S)},
        )


def queue(session: Session, storage: Storage, prepared: PreparedRun, **extra: Any) -> Run:
    """Insert the run and store its input and references; the caller commits, then hands `run_input` to the
    dispatcher (dispatcher.submitted), or deletes the input file with storage.delete_input
    if the commit fails."""
    params = prepared.params.model_dump(mode="json")
    run = lifecycle.create_run(session, **prepared.fields, params=params, **extra)
    storage.save_references(run.id, prepared.reference_bytes)
    if prepared.mask_bytes is not None:
        storage.save_input_mask(run.id, prepared.mask_bytes)
    storage.save_input(run.id, prepared.input_bytes)
    return run


def cancel(service, run_id: str, reason: str | None = None) -> Run:
    """Cancel a queued or running run, as every surface's cancel does: the engine stops at the
    next denoising step and the run costs nothing. Raises Conflict if it already ended."""
    with service.sessions() as session:
        run = session.get(Run, run_id)
        if reason:
            lifecycle.add_log(session, run_id, reason, level="warning")
        run = lifecycle.cancel(session, service.storage, run)
        session.commit()
    service.storage.delete_input(run_id)
    service.dispatcher.cancel(run_id)
    service.sender.wake()
    return run


def renamed(exc: IncontextError, names: dict[str, str]) -> ServiceError:
    """The error with its fields named as the surface's client sent them (input.image_url → input_image)."""
    errors = [field_error(surface_field(e["field"], names), e["message"], e["code"]) for e in getattr(exc, "errors", [])]
    return ServiceError(exc.message, code=exc.code, http_status=exc.http_status, errors=errors, headers=getattr(exc, "headers", None))


def surface_field(field_name: str, names: dict[str, str]) -> str:
    name = field_name.removeprefix("input.")
    return names.get(name, name)


def _abbreviated(value: Any) -> Any:
    # An image field of an echo, whatever its name (image_url, image_urls, reference_image_url, …).
    if isinstance(value, str):
        return abbreviate_data_uri(value)
    if isinstance(value, list):
        return [abbreviate_data_uri(v) if isinstance(v, str) else v for v in value]
    return value


def abbreviate_data_uri(url: str) -> str:
    """Runs echo their input; a multi-megabyte data URI would swell every read of the run."""
    match = _DATA_URI_HEAD.match(url)
    if not match:
        return url
    return f"{match.group(1)},<{len(url) - match.end():,} characters omitted>"


def _single_output_parent(session: Session, parent_run_id: str | None) -> str | None:
    if parent_run_id is None:
        return None
    parent = session.get(Run, parent_run_id)
    return parent_run_id if parent is not None and parent.num_images == 1 else None
