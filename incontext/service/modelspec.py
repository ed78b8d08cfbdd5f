"""What a model accepts and costs, for people and agents: the model card behind
`GET /v1/models/{id}` and the markdown spec behind `GET /v1/models/{id}/llms.txt`.

The inputs are read from `KontextInput`'s JSON schema, the one model every run's input is
validated with, so the published list cannot drift from what is enforced. The few facts a
validator enforces outside the schema (aspect ratio names, safety tolerance values) and what
a model preset decides (the defaults and ranges of steps and guidance, and what guidance
does in that model) are filled in from their sources here.
"""

from __future__ import annotations

import json
from functools import cache

from pydantic import ValidationError

from incontext.engine.protocol import MAX_IMAGES
from incontext.imageio import ASPECT_RATIOS, OUTPUT_FORMATS
from incontext.models.registry import ModelPreset, Registry
from incontext.service import callbacks, lifecycle
from incontext.service.schemas import KontextInput
from incontext.workflows import Workflow

CURRENCY = "USD"
# Short descriptions for fields whose schema has none.
_DESCRIPTIONS = {
    "num_images": "images to make; image i uses seed + i",
    "guidance_scale": "how closely to follow the prompt",
    "output_format": "encoding of the output images",
    "safety_tolerance": 'accepted and recorded ("1" strictest … "6"); this server has no safety checker',
    "enhance_prompt": "accepted and recorded; this server has no prompt enhancer",
}


@cache
def _accepted_tolerances() -> tuple[str, ...]:
    # The validator holds the set; ask it rather than copy it.
    accepted = []
    for value in map(str, range(10)):
        try:
            KontextInput.model_validate({"prompt": "p", "image_url": "u", "safety_tolerance": value})
            accepted.append(value)
        except ValidationError:
            pass
    return tuple(accepted)


# What guidance_scale does, by the preset's guidance_kind (models/registry.py).
_GUIDANCE = {
    "embedded": "how closely to follow the prompt (the model's distilled guidance, one pass per step)",
    "true_cfg": "true classifier-free guidance scale (the pipeline's true_cfg_scale): each step also runs the "
                "negative prompt and moves away from it; 1 turns it off and halves the work",
    "ignored": "accepted and recorded; these step-distilled weights take no guidance",
}


def model_ranges(preset: ModelPreset) -> dict:
    """The model's own ranges of the fields it narrows, as the run input checks them."""
    (lo, hi), (glo, ghi) = preset.steps_range, preset.guidance_range
    return {"num_inference_steps": {"minimum": lo, "maximum": hi}, "guidance_scale": {"minimum": glo, "maximum": ghi}}


def model_defaults(preset: ModelPreset) -> dict:
    """Defaults the preset decides when a run leaves them out (see submission.prepare)."""
    return {"guidance_scale": preset.guidance_scale, "num_inference_steps": preset.num_inference_steps}


def model_inputs(preset: ModelPreset, schema: dict | None = None) -> list[dict]:
    """One entry per input field: name, type, required, default, description, the range
    (minimum/maximum, min_length/max_length, min_items/max_items) or enum it is checked
    against, and `one_of`: the fields of which exactly one is required (image_url, image_urls).
    `schema`: another input's JSON schema (a workflow's) than KontextInput's."""
    schema = schema or KontextInput.model_json_schema()
    required = set(schema.get("required", []))
    one_of = [alternative["required"][0] for alternative in schema.get("oneOf", [])]
    defaults, ranges = model_defaults(preset), model_ranges(preset)
    enums = {"aspect_ratio": list(ASPECT_RATIOS), "safety_tolerance": list(_accepted_tolerances())}
    inputs = []
    for name, prop in schema["properties"].items():
        variants = prop.get("anyOf", [prop])
        base = next(v for v in variants if v.get("type") != "null")
        entry = {"name": name, "type": base["type"], "required": name in required}
        if name not in required:
            entry["default"] = defaults.get(name, prop.get("default"))
            entry["nullable"] = any(v.get("type") == "null" for v in variants)
        entry["description"] = prop.get("description") or _DESCRIPTIONS.get(name, "")
        if name == "guidance_scale":
            entry["description"] = _GUIDANCE[preset.guidance_kind]
        if name in one_of:
            entry["one_of"] = one_of
        bounds = (("minimum", "minimum"), ("maximum", "maximum"), ("minLength", "min_length"), ("maxLength", "max_length"), ("minItems", "min_items"), ("maxItems", "max_items"))
        for key, out in (*bounds, ("enum", "enum")):
            if key in base:
                entry[out] = base[key]
        if name in enums:
            entry["enum"] = enums[name]
        entry.update(ranges.get(name, {}))  # the preset narrows the schema's range
        inputs.append(entry)
    return inputs


def model_license(preset: ModelPreset) -> dict:
    """The weights' licence: its name, whether it allows commercial use (null: unknown) and where to read it."""
    lic = preset.license
    return {"name": lic.name, "commercial_use": lic.commercial_use, "url": lic.url}


def _license_line(preset: ModelPreset) -> str:
    lic = preset.license
    return f"{lic.name} ({lic.use}{f'; {lic.url}' if lic.url else ''})"


def model_links(model_id: str, base_url: str) -> dict[str, str]:
    base = f"{base_url}/v1/models/{model_id}"
    return {"self": base, "runs": f"{base}/runs", "batches": f"{base}/batches", "llms_txt": f"{base}/llms.txt"}


def _pricing(price) -> dict:
    return {"unit": "image", "unit_price": str(price), "currency": CURRENCY, "billing": "per delivered image; failed and canceled runs cost nothing"}


def model_card(preset: ModelPreset, registry: Registry, base_url: str, *, detail: bool = True) -> dict:
    card = {
        "id": preset.id,
        "aliases": list(preset.aliases),
        "default": preset.id == registry.default_id,
        "kind": "model",
        "description": preset.description or "in-context image editing: an image and an instruction in, the edited image out",
        "price_per_image": str(preset.price_per_image),
        "currency": CURRENCY,
        "pricing": _pricing(preset.price_per_image),
        "license": model_license(preset),
        "defaults": model_defaults(preset),
        "ranges": model_ranges(preset),
        "guidance": preset.guidance_kind,
        "consensus": preset.consensus,  # denoisings per output, whose median it is
        "output": {"formats": list(OUTPUT_FORMATS), "pixels_per_image": preset.target_area, "side_multiple": preset.multiple},
        "links": model_links(preset.id, base_url),
    }
    if detail:
        card["inputs"] = model_inputs(preset)
        card["input_schema"] = KontextInput.model_json_schema()
    return card


def workflow_card(workflow: Workflow, preset: ModelPreset, base_url: str, *, detail: bool = True) -> dict:
    """A workflow (incontext/workflows.py) as GET /v1/models shows a model: its own inputs and
    price; the defaults, ranges and licence of the model it runs on (`runs_on`)."""
    links = model_links(workflow.id, base_url)
    del links["batches"]  # a workflow takes runs only
    card = {
        "id": workflow.id,
        "aliases": [],
        "default": False,
        "kind": "workflow",
        "runs_on": preset.id,
        "description": workflow.description,
        "price_per_image": str(workflow.price_per_image),
        "currency": CURRENCY,
        "pricing": _pricing(workflow.price_per_image),
        "license": model_license(preset),
        "defaults": model_defaults(preset),
        "ranges": model_ranges(preset),
        "guidance": preset.guidance_kind,
        "consensus": preset.consensus,
        "output": {"formats": list(OUTPUT_FORMATS), "pixels_per_image": preset.target_area, "side_multiple": preset.multiple,
                   "results": workflow.results},
        "links": links,
    }
    if detail:
        schema = workflow.input.model_json_schema()
        card["inputs"] = model_inputs(preset, schema)
        card["input_schema"] = schema
    return card


def workflow_llms_txt(workflow: Workflow, preset: ModelPreset, base_url: str) -> str:
    """The workflow's markdown spec: what it does, a curl call, its fields and results; the
    statuses, polling, callbacks and errors are the model's (its llms.txt)."""
    inputs = model_inputs(preset, workflow.input.model_json_schema())
    rows = "\n".join(
        f"| `{e['name']}` | {e['type']}{', required' if e['required'] else ''} | {_cell(e.get('default'))} | {_range(e)} "
        f"| {_cell(e['description'])} |"
        for e in inputs
    )
    example = {"image_url": "https://example.com/photo.png"}
    for e in inputs:
        if e["required"] and e["name"] not in example:
            example[e["name"]] = "the red circle" if e["name"] == "prompt" else "https://example.com/other.png"
    body = json.dumps({"input": example})
    return f"""# {workflow.id}

> A workflow: {workflow.description}. One in-context edit by `{preset.id}`, batched with every other
> run. ${workflow.price_per_image} {CURRENCY} per delivered image; failed and canceled runs cost nothing.

- Base URL: {base_url}
- Runs on: `{preset.id}` (its spec: `GET {base_url}/v1/models/{preset.id}/llms.txt`; licence {_license_line(preset)})
- Machine-readable: `GET {base_url}/v1/models/{workflow.id}` (inputs with ranges), `GET {base_url}/openapi.json`
- How each workflow works: `GET {base_url}/v1/docs/workflows.md`

## Create a run

```sh
curl -sS -X POST {base_url}/v1/models/{workflow.id}/runs \\
  -H "Authorization: Bearer $INCONTEXT_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{body}'
```

The answer is `201` with the run, `status_code: "queued"`; poll `GET {base_url}/v1/runs/$RUN_ID` until it
is `succeeded`, `failed` or `canceled`, as for any run (`callback_url`, `metadata`, `client_ref` and
`Idempotency-Key` work as on a model). A bad input is `422` naming the field (`input.reference_image_url`).

## Input fields

| field | type | default | range | notes |
|---|---|---|---|---|
{rows}

## Results

`output.outputs[0]`: `url` (the image), `width`, `height`, `seed`, `changed_share`, and {workflow.results}.
Boxes are `[x0, y0, x1, y1]` in the image's pixels, x1 and y1 exclusive.
"""


def _cell(value) -> str:
    if isinstance(value, bool):  # as a client writes it in JSON
        return "true" if value else "false"
    return "" if value is None else str(value).replace("|", "\\|")


def _range(entry: dict) -> str:
    if "enum" in entry:
        return " ".join(f"`{v}`" for v in entry["enum"])
    if "minimum" in entry or "maximum" in entry:
        return f"{entry.get('minimum', '')}–{entry.get('maximum', '')}"
    if "max_length" in entry:
        return f"≤ {entry['max_length']} characters"
    if "max_items" in entry:
        return f"{entry.get('min_items', 0)}–{entry['max_items']} items"
    return ""


def _one_of(entry: dict) -> str:
    return ", required: one of " + " or ".join(f"`{n}`" for n in entry["one_of"]) if "one_of" in entry else ""


def llms_txt(preset: ModelPreset, model_id: str, base_url: str, *, file_url_ttl_s: int, is_default: bool) -> str:
    """The model's markdown spec: how to call it with curl, its fields, statuses, polling and callbacks."""
    inputs = model_inputs(preset)
    rows = "\n".join(
        f"| `{e['name']}` | {e['type']}{', required' if e['required'] else ''}{_one_of(e)} | {_cell(e.get('default'))} | {_range(e)} "
        f"| {_cell(e['description'])} |"
        for e in inputs
    )
    statuses = "\n".join(f"| `{code}` | {'yes' if terminal else 'no'} | {text} |" for code, terminal, text in lifecycle.STATUSES)
    events = ", ".join(f"`{e}`" for e in callbacks.EVENTS.values())
    aliases = ", ".join(f"`{a}`" for a in (preset.id, *preset.aliases))
    surfaces = (
        f"""- BFL-style: `POST {base_url}/v1/flux-kontext-pro` (`x-key`), then `GET {base_url}/v1/get_result?id=…`.
- OpenAI-style, synchronous: `POST {base_url}/v1/images/edits` (multipart `image`, `prompt`, `n`, `size`).
- Both take `preserve` and `return_mask` as above.
"""
        if is_default
        else ""
    )
    consensus = (f"- Each output is the median of {preset.consensus} denoisings, each with its own noise (`consensus` in the model's card):"
                 " a mark one draw alone makes drops out\n") if preset.consensus > 1 else ""
    return f"""# {model_id}

> {preset.description or "In-context image editing (FLUX.1 Kontext-style)"}: send an image and an instruction, get the
> edited image. ${preset.price_per_image} {CURRENCY} per delivered image; failed and canceled runs cost nothing.

- Base URL: {base_url}
- Model ids (all the same model): {aliases}
- Licence of the weights: {_license_line(preset)}
- Defaults: {preset.num_inference_steps} steps ({preset.steps_range[0]}–{preset.steps_range[1]}), guidance_scale {preset.guidance_scale:g} ({preset.guidance_range[0]:g}–{preset.guidance_range[1]:g}: {_GUIDANCE[preset.guidance_kind]}); outside a range is `422 VALIDATION_ERROR` naming the field
{consensus}- Outputs carry metadata saying they are AI-generated and naming the model (PNG text chunks and XMP, JPEG EXIF and XMP).
- Machine-readable: `GET {base_url}/v1/models/{model_id}` (inputs with ranges), `GET {base_url}/openapi.json`

## Authentication

Send `Authorization: Bearer <key>` on every call below (keys look like `ic_live_…`).
A missing or bad key is `401 UNAUTHORIZED`. `GET {base_url}/v1/auth/me` tells you whether a key works.

## Create a run

```sh
curl -sS -X POST {base_url}/v1/models/{model_id}/runs \\
  -H "Authorization: Bearer $INCONTEXT_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{{"input": {{"prompt": "make the sky purple", "image_url": "https://example.com/photo.jpg"}}}}'
```

The answer is `201` with the run object at once, `status_code: "queued"`. Keep its `id`.
Body fields besides `input`: `metadata` (object, returned untouched), `callback_url` (≤ 2048
chars), `client_ref` (≤ 255 chars). Header `Idempotency-Key`: the same key and body replay
the first answer; the same key with another body is `409 CONFLICT`.

## Input fields

| field | type | default | range | notes |
|---|---|---|---|---|
{rows}

`image_url` takes an http(s) URL, a `data:` URI (JPEG, PNG, WebP, GIF, AVIF), or an output URL
of this server (multi-turn editing; expired ones work too). Unknown fields are ignored.
`image_urls` instead takes up to {MAX_IMAGES} such images: the first is edited and decides the
output's size, the others are references the prompt may draw on (fitted to that size).

`preserve`: with `auto` (the default) every output pixel outside the edited region is the
input's own pixel, and the output has the input's own pixel size when it keeps the input's
aspect ratio (no `aspect_ratio`, `match_input_image`, or one within 2 % of the input's;
otherwise the model's size). `off` returns the model's raw output at its working size (about
{preset.target_area} pixels, sides multiples of {preset.multiple}). PNG output keeps the untouched pixels
bit for bit; JPEG (the default `output_format`) re-encodes them: ask for `png` for bit-exact pixels.

## Statuses

| status_code | terminal | meaning |
|---|---|---|
{statuses}

## Polling

```sh
curl -sS {base_url}/v1/runs/$RUN_ID -H "Authorization: Bearer $INCONTEXT_API_KEY"
```

Repeat about once a second until `status_code` is `succeeded`, `failed` or `canceled`.
On `succeeded`, `output.outputs[i].url` (also `output.image_urls[i]`) is a signed URL, valid
for {file_url_ttl_s} s and downloadable with no key; read the run again for fresh URLs.
`output.seed` reproduces the result. Each `output.outputs[i]` also has `width`, `height`,
`changed_share` (0–1, the share of its pixels that differ from the input; null if unknown) and
`mask_url` (with `return_mask`: the edited region as a PNG, white where the pixels are the
model's, black where they are the input's; a data URI where the url is one (`sync_mode`); otherwise null).
On `failed`, see `failure_code` and `failure_message`.
Progress: `GET {base_url}/v1/runs/$RUN_ID/logs`. Cancel: `POST {base_url}/v1/runs/$RUN_ID/cancel`.

## Callbacks

Set `callback_url` and the server POSTs a JSON envelope when the run ends: `event` ({events}),
`run_id`, `status`, `output` (error envelope on failure, null on cancel), `duration_ms`,
`created_at`, `completed_at`, `metadata`. Create a signing secret once with
`POST {base_url}/v1/callback-secrets`; then every callback carries `Runflow-Signature`
(hex HMAC-SHA256 of the raw body keyed with the secret) and Standard Webhooks headers
(`webhook-id`, `webhook-timestamp`, `webhook-signature`). Non-2xx answers are retried with
backoff; `GET {base_url}/v1/runs/$RUN_ID/callback` shows every attempt.

## Errors

Every error is `{{"code", "message", "errors": [...]}}`; `errors[]` names fields for 422
(`input.prompt`). Codes: `UNAUTHORIZED` 401, `VALIDATION_ERROR` 422, `INVALID_IMAGE` 422,
`IMAGE_FETCH_FAILED` 422, `IMAGE_TOO_LARGE` 413, `UNSUPPORTED_FORMAT` 415,
`MODEL_UNAVAILABLE` 404, `RUN_NOT_FOUND` 404, `CONFLICT` 409, `RATE_LIMITED` 429 (wait
`Retry-After` seconds), `CONTENT_REFUSED` 422 (the operator's content filter refused the
prompt or image; a run whose output it refuses fails with that code and costs nothing).

## Other ways to call the same model

- Many inputs at once: `POST {base_url}/v1/models/{model_id}/batches` with `{{"input": [...]}}`.
{surfaces}"""
