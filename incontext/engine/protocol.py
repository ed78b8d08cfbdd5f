"""What the service and the CLI may ask of an engine.

Routes and the CLI depend on `EngineClient`, never on a concrete engine, so the in-process
engine, a remote one, or a second process can stand behind the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
from PIL import Image


# Images one request may give: the one edited and up to three references (as hosted FLUX
# APIs take input_image … input_image_4).
MAX_IMAGES = 4


@dataclass(frozen=True)
class StepProgress:
    """A request's progress after a denoising step. `preview`, on the steps a request asked
    for one (`EditRequest.previews`), is its first image as the step predicts it will end:
    (h, w, 3) uint8 at the latent resolution (the output's size / 8), from a fixed linear map
    of the latents (engine/preview.py), not the VAE."""

    done: int
    total: int
    preview: np.ndarray | None = None


# Called from the engine's thread (or the thread that reads the engine process) after every
# denoising step; it must return quickly.
ProgressCallback = Callable[[StepProgress], None]


@dataclass(frozen=True)
class StepStats:
    """One engine step, for whoever watches the engine (the service's metrics): plain data,
    so the engine knows nothing of how it is reported."""

    model_id: str
    seconds: float  # the transformer pass and every sample's update; decoding finished requests is not in it
    rows: int  # samples in the step's batch, at most the engine's max_batch_size


# Called like a ProgressCallback, once per engine step (not per request).
StepCallback = Callable[[StepStats], None]


@dataclass(frozen=True)
class EditRequest:
    """One edit: `num_images` outputs of `image` edited by `prompt`, drawing on `references`
    (further images the prompt may name: "put the hat of the second image on the cat"). The
    output has `image`'s size; `image` and every reference are already fitted to it.

    Output i uses seed `seed + i`, so each image can be reproduced alone (also in stock
    diffusers with `torch.Generator().manual_seed(seed + i)`). With `consensus` k > 1, output
    i is the median of k denoisings, drawn with `sampler.draw_seeds(seed + i, k)`.
    """

    request_id: str
    model_id: str
    prompt: str
    image: Image.Image  # RGB, already decoded and validated
    width: int  # output size, already snapped to a size the model supports
    height: int
    seed: int
    num_images: int = 1
    guidance_scale: float = 3.5
    num_inference_steps: int | None = None  # None: the model preset's
    consensus: int | None = None  # draws per output (sampler.merge_draws); None: the model preset's
    # The request whose output `image` is, if any: lets the engine reuse that output's
    # latents instead of a decode/encode round trip (multi-turn editing).
    parent_request_id: str | None = None
    # Low-resolution previews to report over the run, evenly spaced (0: none).
    previews: int = 0
    # Who asked (the service passes the API key's id): the engine shares each denoising step
    # equally between owners, so one key's backlog cannot slow another key's edit to a crawl.
    owner: str = ""
    # Further reference images (MAX_IMAGES in all, `image` included), in the order the client sent them.
    references: tuple[Image.Image, ...] = ()
    # Also decode the context's latents (EditResult.rendered_context), which preserve "auto"
    # compares the output with; a caller that will not use it saves a VAE decode.
    render_context: bool = True
    # A mask of the thing the prompt names (white on black) rather than an edit: a model that
    # ships a selector (incontext/selector.py) answers it from the input's segments without
    # denoising; otherwise, or where the input is not a drawing, the model draws it.
    thing_mask: bool = False
    # The model's true CFG against no instruction, where its directory declares one
    # (sampler.TrueCfg). A workflow whose own instruction it overshoots turns it off (workflows.py).
    true_cfg: bool = True


@dataclass
class EditResult:
    images: list[Image.Image]
    seeds: list[int]
    num_inference_steps: int
    transformer_evals: int = 0  # forward passes spent on this request (per image)
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Per image, where its latents moved from the context's (sampler.change_map): the
    # caller keeps the input's pixels elsewhere (preserve.preserve), off the engine's thread.
    change_maps: list[np.ndarray] = field(default_factory=list)
    # The context's latents decoded: the autoencoder's rendering of the input, which
    # preserve.py tells the model's changes from the autoencoder's error by. None from an
    # engine that does not report it.
    rendered_context: Image.Image | None = None
    # A mask request (EditRequest.thing_mask) the model's selector answered, picking among the
    # input's segments, without denoising: the mask lies on the input's own edges.
    selected: bool = False


class EngineClient(Protocol):
    async def edit(self, request: EditRequest, on_progress: ProgressCallback | None = None) -> EditResult:
        """Run the edit. Raises `incontext.errors.Cancelled` if cancelled, `IncontextError` on bad input."""

    def cancel(self, request_id: str) -> bool:
        """Stop a queued or running request at the next step boundary. True if it was known."""

    def is_ready(self) -> bool:
        """True once the default model is loaded."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...
