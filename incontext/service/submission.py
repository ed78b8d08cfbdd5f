"""A validated `input` → a queued run: the image checked and stored, defaults and the seed
fixed, the price recorded. Shared by single runs and batch items."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from incontext.errors import IncontextError
from incontext.models.registry import ModelPreset
from incontext.service import lifecycle
from incontext.service.errors import RateLimited, at_field
from incontext.service.inputs import RunInput, load_source, output_size
from incontext.service.models import Run
from incontext.service.schemas import KontextInput
from incontext.service.storage import Storage
from incontext.settings import Settings

_DATA_URI_HEAD = re.compile(r"^(data:[^,]{0,100}),", re.IGNORECASE)


@dataclass
class PreparedRun:
    fields: dict[str, Any]  # columns for lifecycle.create_run
    input_bytes: bytes  # stored, so a restart can run it again
    run_input: RunInput  # decoded, and fitted to the output size: what the dispatcher hands on


def prepare(
    item: KontextInput,
    *,
    field: str,
    model_id: str,
    preset: ModelPreset,
    api_key_id: str,
    session: Session,
    storage: Storage,
    settings: Settings,
    remote: Mapping[str, bytes | IncontextError] | None = None,
) -> PreparedRun:
    """Validate the image (http(s) ones already fetched into `remote` by inputs.prefetch);
    raises IncontextError pinned to `field`.image_url etc."""
    try:
        source = load_source(item.image_url, api_key_id=api_key_id, session=session, storage=storage, settings=settings, remote=remote)
    except IncontextError as exc:
        raise at_field(exc, f"{field}.image_url") from None
    try:
        width, height = output_size(source.image, item.aspect_ratio, preset)
    except IncontextError as exc:
        raise at_field(exc, f"{field}.aspect_ratio") from None

    given = item.model_fields_set
    params = {
        "prompt": item.prompt,
        # Drawn here, not in the engine, so it is recorded and a re-run after a restart
        # produces the same images.
        "seed": item.seed if item.seed is not None else secrets.randbelow(2**32),
        "num_images": item.num_images,
        "guidance_scale": item.guidance_scale if "guidance_scale" in given else preset.guidance_scale,
        "num_inference_steps": item.num_inference_steps or preset.num_inference_steps,
        "output_format": item.output_format,
        "sync_mode": item.sync_mode,
        "width": width,
        "height": height,
        # What the output keeps of the input (dispatcher → outputs.py). Runs stored before
        # these existed lack them: read as "auto", False and the echoed input's aspect_ratio.
        "aspect_ratio": item.aspect_ratio,
        "preserve": item.preserve,
        "return_mask": item.return_mask,
        "unit_price_micros": int(preset.price_per_image * 1_000_000),
        # Multi-turn: the engine may reuse the parent's latents, which only identify the
        # image when the parent made exactly one.
        "parent_request_id": _single_output_parent(session, source.parent_run_id),
    }
    echo = item.model_dump(mode="json", include=given - {"client_ref"})
    echo["image_url"] = abbreviate_data_uri(echo["image_url"])
    fields = {
        "api_key_id": api_key_id,
        "model_id": model_id.strip("/"),
        "engine_model_id": preset.id,
        "input": echo,
        "params": params,
        "num_images": item.num_images,
        "parent_run_id": source.parent_run_id,
    }
    # Fitted here, in the request's thread, so the dispatcher hands it to the engine as it is.
    return PreparedRun(fields=fields, input_bytes=source.data, run_input=RunInput.fit(source.image, width, height))


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
    """Insert the run and store its input; the caller commits, then hands `run_input` to the
    dispatcher (dispatcher.submitted), or deletes the input file with storage.delete_input
    if the commit fails."""
    run = lifecycle.create_run(session, **prepared.fields, **extra)
    storage.save_input(run.id, prepared.input_bytes)
    return run


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
