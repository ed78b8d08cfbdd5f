"""An engine's images → a run's stored output: each image preserved (incontext/preserve.py),
shown to the content filter if one is set, encoded with metadata naming the model that made
it, and stored as a file, with its mask if asked.

The dispatcher calls `store` in a worker thread: off the event loop, and off the engine's
thread, so composing and encoding at a large input's size never holds up a denoising step.

    output = outputs.store(run, run_input, result, storage, settings)
    # {"outputs": [{type, content_type, width, height, seed, changed_share,
    #               file, [mask_file]}, ...],
    #  "seed", "num_inference_steps", "timings_ms"}

schemas.public_output turns `file` into `url` and `mask_file` into `mask_url`: a signed URL,
or the file as a data URI in the synchronous answer of a `sync_mode` run (`inline_now`).
A sync_mode run's images are files like any run's: the database never holds them inline
(runs.output is read by every listing), and its history gives their signed URLs.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import numpy as np
from PIL import Image

from incontext import imageio, preserve, workflows
from incontext.engine.protocol import EditResult
from incontext.errors import IncontextError
from incontext.service.db import utcnow
from incontext.service import contentfilter, memory
from incontext.service.errors import NotFound
from incontext.service.inputs import RunInput, decode_stored
from incontext.service.models import Run
from incontext.service.runparams import RunParams
from incontext.service.storage import Storage
from incontext.settings import Settings

log = logging.getLogger(__name__)


def store(run: Run, run_input: RunInput, result: EditResult, storage: Storage, settings: Settings,
          drawn: workflows.Drawn | None = None) -> dict:
    """The run's output dict (as stored in `runs.output`); files are written on the way.
    `drawn`: the mask a workflow's second request (RunParams.select_prompt) came back with, which workflows.finish reads."""
    params = RunParams.of(run)
    if run_input.source is None:
        with _LARGE:
            items, preserve_ms = _store(run, run_input, result, storage, settings, drawn)
            memory.trim()
    else:
        items, preserve_ms = _store(run, run_input, result, storage, settings, drawn)
    timings = {**result.timings_ms, "preserve": preserve_ms}
    return {"outputs": items, "seed": params.seed, "num_inference_steps": result.num_inference_steps, "timings_ms": timings}


# Runs whose source is large (not kept in memory: inputs.KEEP_SOURCE_PIXELS) are composed and
# encoded one at a time: each holds the source, its output and the model's output resized to
# it, about 0.5 GB at the 40 MP limit; four at once took the server past 2 GB (bench load).
_LARGE = threading.Lock()


def _store(run: Run, run_input: RunInput, result: EditResult, storage: Storage, settings: Settings,
           drawn: workflows.Drawn | None) -> tuple[list[dict], float]:
    params = RunParams.of(run)
    fmt, return_mask = params.output_format, params.return_mask
    items, preserve_ms = [], 0.0
    canvas = _Canvas(run, run_input, storage, settings)
    allowed = _client_mask(run, run_input, storage, settings) if params.mask else None
    logo = _logo(run, storage, settings) if params.workflow == "logo-placement" else None
    for index, (edited, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        started = time.perf_counter()
        change = result.change_maps[index] if result.change_maps else None
        image, mask, share = _preserved(run, run_input, canvas, edited, change, allowed, result.rendered_context)
        extra = {}
        if params.workflow:  # what the workflow promises beyond the image: its mask, boxes, placement
            done = workflows.finish(params.workflow, image, mask, source_size=run_input.source_size, placement_box=params.placement,
                                    # what a segmentation's mask, or the removal the drawing picks among, is read against
                                    source=canvas.get() if params.workflow == "segmentation" or drawn is not None else None,
                                    logo=logo, allowed=allowed, drawn=drawn)
            source = canvas.get() if done.image is not image and params.workflow != "segmentation" else None
            if params.workflow == "segmentation":
                share = None  # its output is a mask, not an edit of the input
            elif source is not None and source.size == done.image.size:
                # After what finish laid in or put back (a logo, the input's pixels off the thing removed)
                share = preserve.changed_share(done.image, source)
            image, mask, extra = done.image, done.mask, done.extra
        preserve_ms += (time.perf_counter() - started) * 1000
        try:
            contentfilter.check(settings.content_filter, contentfilter.ContentCheck("output", run.engine_model_id, params.prompt, (image,)))
        except IncontextError:
            storage.delete_outputs(run.id)  # those stored before it: a refused run keeps no output
            raise
        item = {
            "type": "image", "content_type": imageio.content_type(fmt), "width": image.width, "height": image.height, "seed": seed,
            "changed_share": None if share is None else round(share, 4), **extra,
        }
        # Composite: preserve put the model's pixels onto the input's own (`_preserved`).
        composite = allowed is not None or (change is not None and params.preserve != "off")
        provenance = imageio.Provenance(params.model_name or run.engine_model_id, composite=composite)
        item["file"] = storage.save_output(run.id, index, imageio.encode_image(image, fmt, provenance=provenance), fmt)
        if return_mask and mask is not None:
            item["mask_file"] = storage.save_mask(run.id, index, imageio.encode_image(mask, "png"))
        items.append(item)
    return items, preserve_ms


# How long after a sync_mode run ends its synchronous answer (GET /v1/runs/{id}, its callback,
# a surface's own result read) still carries data URIs. A client that asked for sync_mode is
# waiting: a poll backs off to once a second and the callback is rendered as the run ends, so
# seconds would do; five minutes also covers a poll retried after a dropped connection and a
# receiver that reads the run back after its callback. Longer would only make every read of
# the run megabytes again, which is what sync_mode history should not be (runs-api.md).
SYNC_HOLD = timedelta(minutes=5)


def inline_now(run: Run) -> bool:
    """Whether the synchronous answer of `run` carries its images inline now: a sync_mode run,
    within SYNC_HOLD of its end."""
    if run.completed_at is None or not RunParams.of(run).sync_mode:
        return False
    return utcnow() - run.completed_at < SYNC_HOLD


def data_uri(storage: Storage, relpath: str) -> str | None:
    """A stored output file (`<run>/<i>.<ext>`) as a data URI; None once it is gone."""
    try:
        data = storage.output_path(relpath).read_bytes()
    except (NotFound, OSError):
        return None
    return imageio.to_data_uri(data, imageio.format_from_suffix(relpath))


class _Canvas:
    """The input at its own size for composing, read at most once per run and only if an
    output keeps the input's framing (a large source is not kept in memory while its run
    waits: inputs.RunInput)."""

    def __init__(self, run: Run, run_input: RunInput, storage: Storage, settings: Settings):
        self._args = (run.id, storage, settings)
        self._run_input = run_input
        self._image: Image.Image | None = None
        self._read = False

    def get(self) -> Image.Image | None:
        if not self._read:
            self._read = True
            self._image = self._run_input.source_image(*self._args)
            if self._image is None:
                log.warning("run %s: its input file is gone; composing at the model's size", self._args[0])
        return self._image


def _client_mask(run: Run, run_input: RunInput, storage: Storage, settings: Settings) -> Image.Image:
    """The run's mask; a run whose mask file is gone fails rather than edit where its client
    forbade it."""
    mask = run_input.client_mask(run.id, storage, settings)
    if mask is None:
        raise IncontextError("the run's mask file is gone", code="INPUT_LOST")
    return mask


def _logo(run: Run, storage: Storage, settings: Settings) -> Image.Image:
    """A logo placement's logo at its own size (the engine saw it fitted to the output): the
    run's first reference, read back from storage as a restarted run reads it."""
    stored = storage.read_references(run.id, 1)
    if stored is None:
        raise IncontextError("the run's logo file is gone", code="INPUT_LOST")
    return decode_stored(stored[0], settings, keep_alpha=True)


def _preserved(run: Run, run_input: RunInput, canvas: _Canvas, edited: Image.Image, change: np.ndarray | None,
               allowed: Image.Image | None = None, rendered: Image.Image | None = None) -> tuple[Image.Image, Image.Image | None, float | None]:
    """(image, mask, changed share) of one output; the image as it is, with no mask and no
    share, when the engine reported no change map and the client sent no mask (`allowed`)."""
    if change is None and allowed is None:
        return edited, None, None
    # Runs stored before params held it: the echoed input has it when the client sent it.
    aspect_ratio = run.params["aspect_ratio"] if "aspect_ratio" in run.params else run.input.get("aspect_ratio")
    mode = RunParams.of(run).preserve
    # A mask is honoured at the input's own size whatever the mode: outside it the input's
    # own pixels, not the model's rendering of them.
    keeps = (mode != "off" or allowed is not None) and imageio.keeps_framing(aspect_ratio, *run_input.source_size)
    kept = preserve.preserve(edited, change, context=run_input.fitted, source=canvas.get() if keeps else None, mode=mode, mask=allowed,
                              rendered=rendered)
    return kept.image, kept.mask, kept.changed_share
