"""`/openapi.json`: FastAPI's document, completed with what FastAPI cannot see.

- Security: which operations need a key, read from each route's dependencies (the Bearer
  check, or the BFL surface's x-key-or-Bearer check), so it cannot drift from the code.
- Errors: the service answers `{code, message, errors[]}`, not FastAPI's `{detail}`; the
  core operations say so (401, 422 and default). The hosted-API surfaces answer in their
  own shape (surfaces.route_class): BFL and fal keep FastAPI's `detail`, Replicate's are
  problem details as `application/problem+json`; the OpenAI routes declare their own.
- `servers` from the public URL, and `model_id` parameters described (they may hold '/').
- Path parameters as the routes match them (a segment holds no '/', a `{name:path}` no line
  break). A value past that reaches no route: the surfaces' operations list the app's 404
  and 405 beside their own.
- Numeric bounds exact: FastAPI writes them as floats (2**62 as 4.611686018427388e+18, which
  readers print as 4611686018427388000, over the bound); integral ones go back to integers.
- As strict as the server where a route parses a parameter itself: the `status` filter of
  `GET /v1/runs` takes only the statuses of lifecycle.STATUSES (and `cancelled`); the
  `version` of `POST /v1/predictions` only the versions and model ids of the registry.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from incontext.models.registry import Registry
from incontext.service import lifecycle
from incontext.service.auth import authenticate
from incontext.service.routes import replicate
from incontext.service.surfaces import key_from_headers

DESCRIPTION = """Self-hostable in-context image editing (FLUX.1 Kontext-style).

Start with `GET /v1/models`, then read a model's spec at `GET /v1/models/{model_id}/llms.txt`
(curl example, fields, statuses, polling, callbacks). Agents: `GET /v1/agent-skill.md`.
Catalog: `GET /.well-known/api-catalog` (RFC 9727).

Auth: `Authorization: Bearer <key>` wherever an operation lists a security requirement;
the BFL-style routes also take `x-key`. Errors: `{code, message, errors[]}`, except the
BFL-style routes (`{detail}`) and the OpenAI-style route (`{error: {message, type, param, code}}`).
"""

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an incontext API key (ic_live_…)"},
    "xKey": {"type": "apiKey", "in": "header", "name": "x-key", "description": "the same key, as BFL clients send it"},
}
ERROR_SCHEMAS = {
    "FieldError": {
        "type": "object",
        "required": ["field", "loc", "message", "code"],
        "properties": {
            "field": {"type": "string", "examples": ["input.prompt"]},
            "loc": {"type": "array", "items": {"type": "string"}},
            "message": {"type": "string"},
            "code": {"type": "string"},
        },
    },
    "ErrorBody": {
        "type": "object",
        "required": ["code", "message", "errors"],
        "properties": {
            "code": {"type": "string", "examples": ["UNAUTHORIZED", "VALIDATION_ERROR", "RUN_NOT_FOUND", "RATE_LIMITED"]},
            "message": {"type": "string"},
            "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldError"}},
        },
    },
    "ReplicateProblem": {
        "type": "object",
        "required": ["title", "detail", "status"],
        "properties": {
            "title": {"type": "string", "examples": ["Unauthorized", "Validation error", "Not found"]},
            "detail": {"type": "string"},
            "status": {"type": "integer"},
            "invalid_fields": {
                "type": "array",
                "description": "on 422: each field at fault",
                "items": {
                    "type": "object",
                    "required": ["type", "field", "description"],
                    "properties": {"type": {"type": "string"}, "field": {"type": "string"}, "description": {"type": "string"}},
                },
            },
        },
    },
    "BflError": {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}]}},
    },
}

# How each surface's errors go out (its route class renders them; routes/replicate.py and
# routes/bfl.py): media type and schema. The core's are ErrorBody; fal's render as BFL's do.
SURFACE_ERRORS = {
    None: ("application/json", "ErrorBody"),
    "bfl": ("application/json", "BflError"),
    "fal": ("application/json", "BflError"),
    "replicate": ("application/problem+json", "ReplicateProblem"),
}


def install(app: FastAPI, base_url: str, registry: Registry) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
            # Included routers' routes, with their prefixes and tags applied.
            routes = [r for r in iter_route_contexts(app.routes) if isinstance(r.original_route, APIRoute)]
            complete(spec, routes, base_url, registry)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


def complete(spec: dict, routes: list[RouteContext], base_url: str, registry: Registry) -> None:
    spec["servers"] = [{"url": base_url}]
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    schemas = components.setdefault("schemas", {})
    schemas.update(ERROR_SCHEMAS)
    if versioned := schemas.get("VersionedPredictionCreate"):
        versioned["properties"]["version"]["enum"] = replicate.version_references(registry)
    if "ValidationError" not in schemas:  # BflError refers to FastAPI's own
        schemas.pop("BflError")
    by_operation = {(r.path_format, m.lower()): r for r in routes if r.include_in_schema for m in r.methods}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            route = by_operation.get((path, method))
            if route is not None:
                _complete_operation(op, route)
            for param in op.get("parameters", []):
                if param["in"] == "path" and route is not None and (convertor := route.param_convertors.get(param["name"])):
                    param["schema"] = {**param["schema"], "pattern": f"^(?:{convertor.regex})$"}
                if param["name"] == "model_id" and param["in"] == "path":
                    param["description"] = "a model id or alias; may contain '/' (flux-pro/kontext), sent as is"
                if (path, method, param["name"]) == ("/v1/runs", "get", "status"):
                    param["schema"] = _status_filter(param["schema"])
    _exact_bounds(spec)


def _complete_operation(op: dict, route: RouteContext) -> None:
    responses = op.setdefault("responses", {})
    surface = next((t for t in route.tags if t in ("bfl", "fal", "replicate", "openai")), None)
    if depends_on(route.dependant, key_from_headers):
        op["security"] = [{"xKey": []}, {"bearer": []}]
    elif depends_on(route.dependant, authenticate):
        op["security"] = [{"bearer": []}]
    keyed = "security" in op
    if surface == "openai":
        return  # declares its own 4XX/5XX
    media_type, schema = SURFACE_ERRORS[surface]
    content = {media_type: {"schema": _ref(schema)}}
    # FastAPI's 422 is its own `{detail}` shape, as JSON: right for BFL and fal only.
    if surface in (None, "replicate") and "422" in responses:
        responses["422"] = {"description": "invalid request; each field at fault is named", "content": content}
    if keyed:
        responses.setdefault("401", {"description": "missing, unknown or revoked key", "content": content})
    responses.setdefault("default", {"description": "any other error", "content": content})
    if surface is not None and route.param_convertors:
        # A path parameter the route cannot match ('/' in a segment, a line break) leads to no
        # route of the surface, or to another's with other methods: the app answers, in its shape.
        if media_type == "application/json":
            unrouted = {media_type: {"schema": {"anyOf": [_ref(schema), _ref("ErrorBody")]}}}
        else:
            unrouted = {**content, "application/json": {"schema": _ref("ErrorBody")}}
        responses.setdefault("404", {"description": "not found; a path no route matches: the app's `{code, message, errors}`", "content": unrouted})
        responses.setdefault("405", {"description": "a path that is another operation's: the app's `{code, message, errors}`", "content": unrouted})


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _exact_bounds(node: dict | list) -> None:
    for key, value in node.items() if isinstance(node, dict) else enumerate(node):
        if key in _BOUNDS and isinstance(value, float) and value.is_integer():
            node[key] = int(value)
        elif isinstance(value, (dict, list)):
            _exact_bounds(value)


def _status_filter(schema: dict) -> dict:
    """Each value a comma-separated list of known statuses (blanks and empty items are
    skipped, as routes/runs.py reads them)."""
    known = "|".join(sorted({code for code, _, _ in lifecycle.STATUSES} | {"cancelled"}))
    one = rf"\s*(?:{known})?\s*"
    item = {"type": "string", "pattern": rf"^{one}(?:,{one})*$"}
    return {**schema, "anyOf": [{"type": "array", "items": item}, {"type": "null"}]}


def depends_on(dependant: Dependant, call) -> bool:
    return any(d.call is call or depends_on(d, call) for d in dependant.dependencies)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}
