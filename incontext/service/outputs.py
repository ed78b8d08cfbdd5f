"""An engine's images → a run's stored output: each image preserved (incontext/preserve.py),
encoded, and stored as a file (inlined as a data URI in sync_mode), with its mask if asked.

The dispatcher calls `store` in a worker thread: off the event loop, and off the engine's
thread, so composing and encoding at a large input's size never holds up a denoising step.

    output = outputs.store(run, run_input, result, storage)
    # {"outputs": [{type, content_type, width, height, seed, changed_share,
    #               file | data_uri, [mask_file | mask_data_uri]}, ...],
    #  "seed", "num_inference_steps", "timings_ms"}

schemas.public_output turns `file`/`data_uri` into `url` and `mask_*` into `mask_url`.
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from incontext import imageio, preserve
from incontext.engine.protocol import EditResult
from incontext.service.inputs import RunInput
from incontext.service.models import Run
from incontext.service.runparams import RunParams
from incontext.service.storage import Storage


def store(run: Run, run_input: RunInput, result: EditResult, storage: Storage) -> dict:
    """The run's output dict (as stored in `runs.output`); files are written on the way."""
    params = RunParams.of(run)
    fmt, sync, return_mask = params.output_format, params.sync_mode, params.return_mask
    items, preserve_ms = [], 0.0
    for index, (edited, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        started = time.perf_counter()
        change = result.change_maps[index] if result.change_maps else None
        image, mask, share = _preserved(run, run_input, edited, change)
        preserve_ms += (time.perf_counter() - started) * 1000
        item = {
            "type": "image", "content_type": imageio.content_type(fmt), "width": image.width, "height": image.height, "seed": seed,
            "changed_share": None if share is None else round(share, 4),
        }
        data = imageio.encode_image(image, fmt)
        if sync:
            item["data_uri"] = imageio.to_data_uri(data, fmt)
        else:
            item["file"] = storage.save_output(run.id, index, data, fmt)
        if return_mask and mask is not None:
            png = imageio.encode_image(mask, "png")
            if sync:
                item["mask_data_uri"] = imageio.to_data_uri(png, "png")
            else:
                item["mask_file"] = storage.save_mask(run.id, index, png)
        items.append(item)
    timings = {**result.timings_ms, "preserve": preserve_ms}
    return {"outputs": items, "seed": params.seed, "num_inference_steps": result.num_inference_steps, "timings_ms": timings}


def _preserved(run: Run, run_input: RunInput, edited: Image.Image, change: np.ndarray | None) -> tuple[Image.Image, Image.Image | None, float | None]:
    """(image, mask, changed share) of one output; the image as it is, with no mask and no
    share, when the engine reported no change map."""
    if change is None:
        return edited, None, None
    # Runs stored before params held it: the echoed input has it when the client sent it.
    aspect_ratio = run.params["aspect_ratio"] if "aspect_ratio" in run.params else run.input.get("aspect_ratio")
    source = run_input.source
    keeps = imageio.keeps_framing(aspect_ratio, source.width, source.height)
    kept = preserve.preserve(
        edited, change, context=run_input.fitted, source=source if keeps else None, mode=RunParams.of(run).preserve
    )
    return kept.image, kept.mask, kept.changed_share
