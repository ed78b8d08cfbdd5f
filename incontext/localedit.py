"""`incontext edit` without a server: the engine the server runs, in this process, so every
model family it serves (FLUX.1 Kontext, FLUX.2 [klein], Qwen-Image-Edit) edits from the CLI
too, with the same preservation.

    image → fitted to the model's size → EditRequest → LocalEngine.edit → preserve → outputs
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from incontext import imageio, preserve, workflows
from incontext.engine.protocol import EditRequest
from incontext.errors import IncontextError


@dataclass(frozen=True)
class LocalEdit:
    """What the CLI asks for, its files already decoded."""

    image: Image.Image
    prompt: str
    seed: int
    model: str | None = None  # an id, an alias or a model directory; None: the default
    num_images: int = 1
    guidance_scale: float | None = None  # None: the model's preset
    num_inference_steps: int | None = None
    aspect_ratio: str | None = None
    preserve: str = "auto"
    references: tuple[Image.Image, ...] = ()
    mask: Image.Image | None = None  # where the output may differ from the input
    select: str | None = None  # a workflow's second edit of the same image (workflows.Plan.select), run beside the first
    mask_answers: bool = False  # a mask the selector picks is the whole answer (workflows.MASK_ANSWERS)
    true_cfg: bool = True  # the model's true CFG (EditRequest.true_cfg; a workflow's Workflow.true_cfg)


def edit_here(req: LocalEdit, *, model_dirs: dict[str, Path] | None = None, default_dir: Path | None = None,
              on_step: Callable[[int, int], None] | None = None) -> tuple[str, list[preserve.Preserved], workflows.Drawn | None]:
    """(the name outputs give the model, each output preserved, the `select` request's mask or
    None): one edit on a LocalEngine that lives for this call (with `select`, two in one
    batch). `model_dirs`/`default_dir`: INCONTEXT_MODEL_DIRS and INCONTEXT_MODEL_DIR, so the
    CLI knows the ids a server on this machine would."""
    from incontext.engine.local import LocalEngine
    from incontext.models.registry import default_registry

    if not req.prompt.strip():
        raise IncontextError("the prompt is empty: say what to change", code="INVALID_INPUT")
    src = req.image
    allowed = None
    if req.mask is not None:
        try:
            allowed = preserve.as_mask(req.mask, src.size)
        except ValueError as e:
            raise IncontextError(f"--mask: {e}", code="INVALID_MASK") from None
    registry = default_registry(model_dirs, default_dir=default_dir)
    preset = registry.resolve(req.model)
    w, h = imageio.output_size(src.width, src.height, req.aspect_ratio, target_area=preset.target_area, multiple=preset.multiple)
    fitted = imageio.fit_to_size(src, w, h)
    request = EditRequest(
        request_id="cli", model_id=req.model or preset.id, prompt=req.prompt, image=fitted, width=w, height=h, seed=req.seed,
        num_images=req.num_images, guidance_scale=req.guidance_scale if req.guidance_scale is not None else preset.guidance_scale,
        num_inference_steps=req.num_inference_steps, references=tuple(imageio.fit_to_size(r, w, h) for r in req.references),
        render_context=req.preserve == "auto", true_cfg=req.true_cfg,
    )

    async def run():
        # Eager (no compile_dir): a one-off edit would wait for a build it never reuses.
        engine = LocalEngine(registry, max_batch_size=max(8, req.num_images))
        engine.start_thread()  # no preload: only the model asked for is loaded
        try:
            progress = (lambda p: on_step(p.done, p.total)) if on_step else None
            return await workflows.edit_with_select(engine, request, req.select, progress, mask_answers=req.mask_answers)
        finally:
            await engine.close()

    result, drawn = asyncio.run(run())
    source = src if imageio.keeps_framing(req.aspect_ratio, src.width, src.height) else None
    if result.selected:  # the selector's mask is the answer (workflows.MASK_ANSWERS): no pixel of the input was edited
        kept = [preserve.Preserved(img, Image.new("L", img.size, 0), 0.0) for img in result.images]
    else:
        kept = [
            preserve.preserve(img, change, context=fitted, source=source, mode=req.preserve, mask=allowed, rendered=result.rendered_context)
            for img, change in zip(result.images, result.change_maps)
        ]
    return preset.weights_name, kept, drawn



