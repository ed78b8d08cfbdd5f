"""The `incontext` command line: edit images, list models, train, serve, benchmark.

    incontext edit photo.png "make the red circle blue" -o out.png
    incontext edit room.png "put the lamp from the second image on the table" --reference lamp.png -o out.png
    incontext edit photo.png "make the sky pink" --mask sky.png -o out.png   # white: may change
    incontext workflow object-removal photo.png "the red circle" -o out.png --mask-out removed.png
    incontext workflow logo-placement photo.png --reference logo.png -o out.png   # picks a spot, prints it
    incontext models
    incontext serve --port 8000
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from incontext.errors import IncontextError

app = typer.Typer(help="Self-hostable in-context image editing (FLUX.1 Kontext-style).", no_args_is_help=True, add_completion=False)
console = Console()
err_console = Console(stderr=True)


def _fail(e: Exception) -> None:
    code = getattr(e, "code", "ERROR")
    message = getattr(e, "message", str(e))
    err_console.print(f"[red]error[/red] {code}: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _indexed(out: Path, i: int, n: int) -> Path:
    return out if n == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")


@app.command()
def edit(
    image: Path = typer.Argument(..., help="Input image (JPEG, PNG, WebP, GIF, AVIF)."),
    prompt: str = typer.Argument(..., help='The instruction, e.g. "make the red circle blue".'),
    reference: Optional[list[Path]] = typer.Option(
        None, "--reference", help="A further image the prompt may draw on (up to 3; repeat the option), fitted to the output's size."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Output file; .jpg/.jpeg/.png. With --num-images > 1, an index is added."),
    seed: Optional[int] = typer.Option(None, help="Random seed (printed; reuse it to reproduce a result)."),
    guidance: Optional[float] = typer.Option(None, min=1.0, max=20.0, help="Guidance scale 1–20 (default: the model's, 3.5)."),
    steps: Optional[int] = typer.Option(None, min=1, max=100, help="Denoising steps (default: the model's)."),
    num_images: int = typer.Option(1, "--num-images", min=1, max=4, help="Number of outputs, 1–4, from one batched pass."),
    aspect_ratio: Optional[str] = typer.Option(None, "--aspect-ratio", help="21:9 16:9 4:3 3:2 1:1 2:3 3:4 9:16 9:21 (default: the input's)."),
    model: Optional[str] = typer.Option(None, help="A model id (see `incontext models`) or a model directory."),
    preserve: str = typer.Option("auto", help="auto: the input's own pixels, at its own size, wherever the edit did not happen; off: the model's raw output at its working size."),
    mask: Optional[Path] = typer.Option(
        None, help="Where the edit may happen (white may change, black keeps the input's pixels bit for bit, also with "
        "--preserve off); stretched to IMAGE's size.",
    ),
    mask_out: Optional[Path] = typer.Option(None, "--mask-out", help="Also write the edited region as a PNG (white: the model's pixels, black: the input's)."),
    quality: int = typer.Option(95, min=1, max=100, help="JPEG quality."),
    server: Optional[str] = typer.Option(None, help="Send the edit to an incontext server at this URL instead of running it here."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="INCONTEXT_API_KEY", help="Key for --server."),
) -> None:
    """Edit IMAGE as PROMPT says and write the result to OUTPUT."""
    from incontext import imageio
    from incontext.engine.protocol import MAX_IMAGES

    try:
        fmt = imageio.format_from_suffix(output)
        if seed is None:
            seed = random.randrange(2**31)
        if preserve not in ("auto", "off"):
            raise IncontextError(f"--preserve must be auto or off, not {preserve!r}", code="INVALID_INPUT")
        references = list(reference or [])
        if 1 + len(references) > MAX_IMAGES:
            raise IncontextError(f"at most {MAX_IMAGES - 1} --reference images (the edited one makes {MAX_IMAGES})", code="INVALID_INPUT")
        if server:
            model_id, results = _edit_remote(
                server, api_key, image, prompt, seed, guidance, steps, num_images, aspect_ratio, model, fmt, preserve, mask_out is not None, references, mask
            )
        else:
            model_id, results, _ = _edit_local(image, prompt, seed, guidance, steps, num_images, aspect_ratio, model, preserve, references, mask)
        # As the service marks its outputs: AI-generated, by this model (imageio.Provenance).
        provenance = imageio.Provenance(model_id, composite=preserve != "off" or mask is not None)
        output.parent.mkdir(parents=True, exist_ok=True)
        for i, (img, region, share) in enumerate(results):
            path = _indexed(output, i, len(results))
            path.write_bytes(imageio.encode_image(img, fmt, quality=quality, provenance=provenance))
            changed = f", {share:.1%} of pixels changed" if share is not None else ""
            console.print(f"wrote {path} ({img.width}×{img.height}, seed {seed + i}{changed})", highlight=False)
            if mask_out is not None and region is not None:
                mask_path = _indexed(mask_out, i, len(results))
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                mask_path.write_bytes(imageio.encode_image(region, "png"))
                console.print(f"wrote {mask_path} (the edited region)", highlight=False)
        console.print(f"seed: {seed}", highlight=False)
    except IncontextError as e:
        _fail(e)
    except Exception as e:  # the server's answers, when editing through --server
        from incontext.client import APIError, RunError, RunTimeout

        if isinstance(e, APIError):
            _fail(e)
        if isinstance(e, (RunError, RunTimeout)):
            run = e.run
            _fail(IncontextError(f"run {run.get('id')} {run.get('status_code')}: {run.get('failure_message') or e}", code=run.get("failure_code") or "RUN_FAILED"))
        import httpx

        if isinstance(e, (OSError, httpx.TransportError)) and server:  # connection refused, DNS, timeouts
            _fail(IncontextError(f"cannot reach {server}: {e}", code="SERVER_UNREACHABLE"))
        raise


def _edit_local(image, prompt, seed, guidance, steps, num_images, aspect_ratio, model_id, preserve_mode, references=(), mask=None,
                select=None, mask_answers=False, true_cfg=True):
    """(the name outputs give the model, [(image, region mask, changed share)] for each output,
    the `select` request's mask or None), edited here on the server's engine (localedit.py): every
    model family the server serves. The edited image decides the output's size; each reference
    is fitted to it; `mask` (a path or an "L" image: a workflow's placement) bounds where the
    output may differ from the input; `select`, a workflow's second edit run beside the first."""
    from PIL import Image

    from incontext import imageio
    from incontext.localedit import LocalEdit, edit_here
    from incontext.settings import Settings

    settings = Settings()
    request = LocalEdit(
        image=imageio.load_image(image), prompt=prompt, seed=seed, model=model_id, num_images=num_images, guidance_scale=guidance,
        num_inference_steps=steps, aspect_ratio=aspect_ratio, preserve=preserve_mode,
        references=tuple(imageio.load_image(r) for r in references),
        mask=mask if isinstance(mask, Image.Image) or mask is None else imageio.load_image(mask), select=select,
        mask_answers=mask_answers, true_cfg=true_cfg,
    )
    columns = (TextColumn("editing"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("denoise", total=None)
        name, kept, drawn = edit_here(request, model_dirs=settings.model_dirs, default_dir=settings.model_dir,
                                      on_step=lambda done, total: progress.update(task, completed=done, total=total))
    return name, [(k.image, k.mask, k.changed_share) for k in kept], drawn


def _edit_remote(server, api_key, image, prompt, seed, guidance, steps, num_images, aspect_ratio, model_id, fmt, preserve_mode, return_mask, references=(), mask=None):
    """(the name outputs give the model, [(image, region mask or None, changed share)] for each output), edited by the server."""
    import base64

    from incontext import imageio
    from incontext.client import Client

    uris = []
    for path in (image, *references, *([mask] if mask is not None else [])):
        if not Path(path).is_file():
            raise IncontextError(f"no such file: {path}", code="INVALID_INPUT")
        # The server sniffs the real format; the media type is only a label.
        uris.append("data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode())
    mask_uri = {"mask_image_url": uris.pop()} if mask is not None else {}
    images = {"image_url": uris[0]} if len(uris) == 1 else {"image_urls": uris}
    inp = {"prompt": prompt, **images, **mask_uri, "seed": seed, "num_images": num_images, "output_format": fmt, "sync_mode": True, "preserve": preserve_mode, "return_mask": return_mask}
    if guidance is not None:
        inp["guidance_scale"] = guidance
    if steps is not None:
        inp["num_inference_steps"] = steps
    if aspect_ratio:
        inp["aspect_ratio"] = aspect_ratio
    with Client(server, api_key or "") as client:
        run = client.submit(model_id or "flux-pro/kontext", inp)
        run = _follow(client, run["id"])
    outputs = run["output"]["outputs"]
    return run.get("model_id") or model_id or "flux-pro/kontext", [(imageio.decode_data_uri(o["url"]), imageio.decode_data_uri(o["mask_url"]) if o.get("mask_url") else None, o.get("changed_share"))
            for o in outputs]


def _follow(client, run_id: str) -> dict:
    """The run when it ends, with a progress bar fed by its event stream (polling, for a server
    without one); raises the client's RunFailed/RunCanceled as `Client.wait` does."""
    from incontext.client import APIError, _outcome

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("waiting", total=None)
        try:
            for kind, data in client.events(run_id):
                if kind == "queued":
                    progress.update(task, description=f"queued, {data.get('queue_position') or 0} ahead")
                elif kind == "running":
                    progress.update(task, description="editing")
                elif kind == "step":
                    progress.update(task, description="editing", completed=data["step"], total=data["total_steps"])
                elif kind == "end":
                    return _outcome(data)
        except APIError as e:
            if e.status_code not in (404, 405) or e.code == "RUN_NOT_FOUND":
                raise
        progress.update(task, description="waiting for the server")  # no event stream there: poll
        return client.wait(run_id)


@app.command()
def workflow(
    name: str = typer.Argument(..., help="object-removal, background-replace, logo-placement or segmentation."),
    image: Path = typer.Argument(..., help="Input image."),
    prompt: Optional[str] = typer.Argument(None, help='What to remove or segment ("the red circle"); for the others, the whole instruction (optional).'),
    reference: Optional[Path] = typer.Option(None, "--reference", help="background-replace: the background's image; logo-placement: the logo."),
    mask: Optional[Path] = typer.Option(None, help="logo-placement: where the logo may go (white); without it a spot is picked."),
    output: Path = typer.Option(..., "-o", "--output", help="Output image (.png keeps the kept pixels bit for bit)."),
    mask_out: Optional[Path] = typer.Option(None, "--mask-out", help="Also write the workflow's mask (the region changed; segmentation: the mask)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (printed)."),
    steps: Optional[int] = typer.Option(None, min=1, max=50, help="Denoising steps (default: the model's)."),
    server: Optional[str] = typer.Option(None, help="Run it on an incontext server at this URL instead of here."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="INCONTEXT_API_KEY", help="Key for --server."),
) -> None:
    """Run a workflow (docs/workflows.md) on IMAGE: one edit by the default model, and what the
    workflow reports (mask, boxes, placement)."""
    from incontext import imageio, workflows

    try:
        if name not in workflows.WORKFLOWS:
            raise IncontextError(f"no workflow {name!r}; workflows: {', '.join(workflows.WORKFLOWS)}", code="INVALID_INPUT")
        flow = workflows.WORKFLOWS[name]
        seed = seed if seed is not None else random.randrange(2**31)
        # The input as the server takes it, files for URLs: the same schema checks it.
        extra = [f for f in flow.input.model_fields if f.endswith("_image_url") and f != "mask_image_url"]
        given = {"image_url": image, "prompt": prompt, "mask_image_url": mask, "seed": seed, "num_inference_steps": steps,
                 **({extra[0]: reference} if extra else {})}
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in given.items() if v is not None}
        for key, value in fields.items():
            if key.endswith("_url") and not Path(value).is_file():
                raise IncontextError(f"no such file: {value}", code="INVALID_INPUT")
        try:
            inp = flow.input.model_validate(fields)
        except Exception as e:  # pydantic's ValidationError: name the option, not the JSON field
            option = {"reference_image_url": "--reference", "logo_image_url": "--reference", "prompt": "PROMPT"}
            wrong = ", ".join(option.get(str(err["loc"][0]), str(err["loc"][0])) + f": {err['msg']}" for err in e.errors())
            raise IncontextError(f"{name}: {wrong}", code="INVALID_INPUT") from None
        image_out, mask_img, extra_out = (_workflow_remote if server else _workflow_local)(flow, inp, fields, server, api_key)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(imageio.encode_image(image_out, imageio.format_from_suffix(output), provenance=imageio.Provenance(flow.id, composite=True)))
        console.print(f"wrote {output} ({image_out.width}×{image_out.height}, seed {seed})", highlight=False)
        if mask_out is not None and mask_img is not None:
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            mask_out.write_bytes(imageio.encode_image(mask_img, "png"))
            console.print(f"wrote {mask_out} (the mask)", highlight=False)
        for key, value in extra_out.items():
            console.print(f"{key}: {value}", highlight=False)
    except IncontextError as e:
        _fail(e)
    except Exception as e:  # the server's answers, with --server
        from incontext.client import APIError, RunError

        if isinstance(e, APIError):
            _fail(e)
        if isinstance(e, RunError):
            _fail(IncontextError(f"run {e.run.get('id')}: {e.run.get('failure_message') or e}", code=e.run.get("failure_code") or "RUN_FAILED"))
        raise


def _workflow_local(flow, inp, fields, server, api_key):
    """(image, mask, {boxes, placement}) of a workflow run here, as the server runs it."""
    from incontext import imageio, preserve, workflows

    plan = flow.plan(inp)
    source = imageio.load_image(plan.images[0])
    mask, box, prompt = None, None, plan.prompt
    if plan.mask is not None:  # stretched to the image as the server stretches it
        try:
            mask = preserve.as_mask(imageio.load_image(plan.mask), source.size)
        except ValueError as e:
            raise IncontextError(f"--mask: {e}", code="INVALID_MASK") from None
    logo = imageio.load_image(plan.images[1], keep_alpha=True) if plan.place else None
    if plan.place:  # as submission.prepare does: the mask's box, or a spot picked here
        box = workflows.mask_box(mask) if mask is not None else workflows.placement(source, logo.size)
        mask = mask if mask is not None else workflows.box_mask(source.size, box)
        prompt = prompt.replace("{position}", workflows.position_name(box, source.size))
    if plan.backdrop:  # as submission.prepare does: only the backdrop may change, if the input has one
        mask = workflows.backdrop_mask(source)
    _, results, drawn = _edit_local(plan.images[0], prompt, inp.seed, inp.guidance_scale, inp.num_inference_steps, 1, None, None,
                                    plan.preserve, list(plan.images[1:]), mask, select=plan.select,
                                    mask_answers=flow.id in workflows.MASK_ANSWERS, true_cfg=flow.true_cfg)
    image, region, _ = results[0]
    done = workflows.finish(flow.id, image, region, source_size=source.size, placement_box=box, source=source, logo=logo, allowed=mask,
                            drawn=drawn)
    return done.image, done.mask, done.extra


def _workflow_remote(flow, inp, fields, server, api_key):
    """(image, mask, {boxes, placement}) of a workflow run by the server at `server`."""
    import base64

    from incontext import imageio
    from incontext.client import Client

    body = {k: "data:image/png;base64," + base64.b64encode(Path(v).read_bytes()).decode() if k.endswith("_url") else v
            for k, v in fields.items()}
    with Client(server, api_key or "") as client:
        run = _follow(client, client.submit(flow.id, {**body, "sync_mode": True})["id"])
    out = run["output"]["outputs"][0]
    mask = imageio.decode_data_uri(out["mask_url"]).convert("L") if out.get("mask_url") else None
    return imageio.decode_data_uri(out["url"]), mask, {k: out[k] for k in ("boxes", "placement") if k in out}


@app.command()
def models() -> None:
    """List model ids, their directories, presets and licences (INCONTEXT_MODEL_DIR and
    INCONTEXT_MODEL_DIRS included, as `serve` registers them)."""
    from incontext.models.registry import default_registry
    from incontext.settings import Settings

    settings = Settings()
    # One block per model rather than a table: directories are long and must not be cut.
    for p in default_registry(settings.model_dirs, default_dir=settings.model_dir).models.values():
        side = int(p.target_area**0.5)
        (lo, hi), (glo, ghi) = p.steps_range, p.guidance_range
        console.print(f"[bold]{p.id}[/bold]" + (f"  (aliases: {', '.join(p.aliases)})" if p.aliases else ""), highlight=False, soft_wrap=True)
        console.print(f"  directory: {p.directory}", highlight=False, soft_wrap=True)
        console.print(f"  preset: {p.num_inference_steps} steps ({lo}–{hi}), guidance {p.guidance_scale:g} ({glo:g}–{ghi:g}, {p.guidance_kind}), "
                      f"${p.price_per_image} per image, ~{side}×{side} pixels", highlight=False, soft_wrap=True)
        console.print(f"  license: {p.license.name} ({p.license.use})", markup=False, highlight=False, soft_wrap=True)  # "FLUX.1 [dev] …"


def _register_subcommands() -> None:
    """`serve`/`keys`, `bench` and `train` live beside the code they drive."""
    from incontext.bench.cli import register as register_bench
    from incontext.service.cli import register as register_service
    from incontext.train.cli import train_app

    register_service(app)
    register_bench(app)
    app.add_typer(train_app, name="train")


_register_subcommands()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # httpx logs every request at INFO: one line per poll of `edit --server` said nothing useful.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app()
