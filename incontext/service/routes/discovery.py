"""Discovery: readiness, the models and their specs, the RFC 9727 API catalog, docs and the
agent skill. None of these needs a key: they describe the service, not a caller's data
(models and prices are public on hosted APIs too). `GET /v1/health` lives in account.py.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from incontext import workflows
from incontext.service import modelspec
from incontext.service.deps import PresetDep, ServiceDep
from incontext.service.errors import NotFound

log = logging.getLogger(__name__)

router = APIRouter(tags=["discovery"])

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
DOC_PAGES = ("runs-api.md", "workflows.md", "other-surfaces.md", "agent-skill.md")
CATALOG_PROFILE = "https://www.rfc-editor.org/info/rfc9727"
OPENAPI_TYPE = "application/vnd.oai.openapi+json;version=3.1"


class MarkdownResponse(PlainTextResponse):
    media_type = "text/markdown"


class LinksetResponse(JSONResponse):
    media_type = "application/linkset+json"


# Readiness.
class Check(BaseModel):
    ok: bool
    latency_ms: float
    error: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class Readiness(BaseModel):
    ok: bool
    status: str = Field(description="ready or not_ready")
    checks: dict[str, Check] = Field(description="database, storage, model")


def _timed(probe) -> Check:
    started = time.perf_counter()
    try:
        detail = probe() or {}
        ok, error = detail.pop("ok", True), detail.pop("error", None)
    except Exception as exc:  # noqa: BLE001 (a failed check is the answer, not an error)
        log.warning("readiness check failed: %s", exc, exc_info=True)
        # The class only: this route is public, and driver messages can name hosts and users.
        ok, error, detail = False, exc.__class__.__name__, {}
    return Check(ok=ok, latency_ms=round((time.perf_counter() - started) * 1000, 2), error=error, detail=detail)


def readiness_checks(service) -> dict[str, Check]:
    def database():
        with service.sessions() as session:
            session.execute(sa.text("SELECT 1"))

    def storage():
        for directory in (service.storage.inputs, service.storage.outputs):
            probe = directory / f".readiness-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        return {"free_bytes": shutil.disk_usage(service.storage.outputs).free}

    def model():
        ready = service.engine.is_ready()
        return {"ok": ready, "error": None if ready else "the model is still loading", "model_id": service.registry.default_id}

    return {"database": _timed(database), "storage": _timed(storage), "model": _timed(model)}


@router.get("/v1/readiness", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
def readiness(request: Request):
    """Whether this process can take work: the database answers, the data dir is writable,
    the model is loaded. 503 (same body) when any check fails. No key."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        checks = {name: Check(ok=False, latency_ms=0, error="starting") for name in ("database", "storage", "model")}
    else:
        checks = readiness_checks(service)
    ok = all(c.ok for c in checks.values())
    body = Readiness(ok=ok, status="ready" if ok else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


# Models.
class ModelInput(BaseModel):
    name: str
    type: str
    required: bool
    default: Any = None
    nullable: bool | None = None
    description: str
    minimum: float | None = None
    maximum: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    enum: list[str] | None = None
    one_of: list[str] | None = Field(None, description="the fields of which exactly one is required (image_url, image_urls)")


class ModelLicense(BaseModel):
    name: str = Field(description='an SPDX id where there is one ("Apache-2.0"), else the licence\'s title; "unknown" when not known')
    commercial_use: bool | None = Field(description="whether the licence allows commercial use; null: not known")
    url: str | None = Field(description="where to read the licence; null: no address known")

    @model_serializer(mode="wrap")
    def _with_nulls(self, handler: SerializerFunctionWrapHandler) -> dict:
        # The routes leave out null fields; here null is the answer ("not known"), so it stays.
        return {**handler(self), "commercial_use": self.commercial_use, "url": self.url}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        # Documented by its fields: the serializer above returns a dict, which the OpenAPI
        # document would otherwise show as an object of anything.
        return handler({k: v for k, v in core_schema.items() if k != "serialization"})


class ModelPublic(BaseModel):
    id: str
    aliases: list[str]
    default: bool
    kind: str = Field("model", description="model, or workflow: a task run as one edit by the model `runs_on` names (docs/workflows.md)")
    runs_on: str | None = Field(None, description="a workflow's model")
    description: str
    price_per_image: str = Field(description="decimal string, USD")
    currency: str
    pricing: dict[str, str]
    license: ModelLicense
    defaults: dict[str, Any]
    output: dict[str, Any]
    links: dict[str, str]
    inputs: list[ModelInput] | None = Field(None, description="detail only")
    input_schema: dict[str, Any] | None = Field(None, description="detail only: the JSON schema `input` is validated with")


class OpenAIModel(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    items: list[ModelPublic]
    # The same models as OpenAI lists them, so the OpenAI SDKs' models.list() works: one entry
    # per id and alias (each is a name a client may send).
    object: str = "list"
    data: list[OpenAIModel]


@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
def list_models(service: ServiceDep):
    """Every model this server serves, with aliases and price (`items`), and the workflows
    (`kind: "workflow"`, run by the default model); also as OpenAI's
    `{object: "list", data: [{id, object, created, owned_by}]}`. No key."""
    presets, base = service.registry.models.values(), service.storage.base_url
    data = [{"id": name, "created": 0, "owned_by": name.split("/")[0] if "/" in name else "incontext"}
            for name in (*(n for p in presets for n in (p.id, *p.aliases)), *workflows.WORKFLOWS)]
    items = [modelspec.model_card(p, service.registry, base, detail=False) for p in presets]
    default = service.registry.registered(None)
    items += [modelspec.workflow_card(w, default, base, detail=False) for w in workflows.WORKFLOWS.values()]
    return {"items": items, "data": data}


# Before the detail route: its {model_id:path} would swallow ".../llms.txt".
@router.get("/v1/models/{model_id:path}/llms.txt", response_class=MarkdownResponse)
def model_llms_txt(model_id: str, preset: PresetDep, service: ServiceDep):
    """The model's markdown spec for people and LLMs: curl example, fields, statuses,
    polling, callbacks. `model_id` may contain slashes. No key."""
    text = modelspec.llms_txt(
        preset, model_id.strip("/"), service.storage.base_url,
        file_url_ttl_s=service.settings.file_url_ttl_seconds, is_default=preset.id == service.registry.default_id,
    )
    return MarkdownResponse(text)


@router.get("/v1/models/{model_id:path}", response_model=ModelPublic, response_model_exclude_none=True)
def get_model(preset: PresetDep, service: ServiceDep, model_id: str):
    """One model (by id or alias; `model_id` may contain slashes): inputs with type,
    default and range or enum, generated from the input schema; price; links. No key."""
    return modelspec.model_card(preset, service.registry, service.storage.base_url)


# The API catalog (RFC 9727) and documents.
def catalog_link(base_url: str) -> str:
    return f'<{base_url}/.well-known/api-catalog>; rel="api-catalog"'


def api_catalog(base_url: str, model_ids: list[str]) -> dict:
    """One linkset entry for this API: its OpenAPI description, its docs, its status."""
    docs = [{"href": f"{base_url}/docs", "type": "text/html", "title": "interactive API reference"}]
    docs += [{"href": f"{base_url}/v1/docs/{page}", "type": "text/markdown", "title": page} for page in DOC_PAGES if page != "agent-skill.md"]
    docs.append({"href": f"{base_url}/v1/agent-skill.md", "type": "text/markdown", "title": "agent skill: how to call this API step by step"})
    docs += [{"href": f"{base_url}/v1/models/{m}/llms.txt", "type": "text/markdown", "title": f"model {m}"} for m in model_ids]
    return {
        "linkset": [
            {
                "anchor": f"{base_url}/v1",
                "service-desc": [{"href": f"{base_url}/openapi.json", "type": OPENAPI_TYPE}],
                "service-doc": docs,
                "status": [
                    {"href": f"{base_url}/v1/health", "type": "application/json", "title": "liveness"},
                    {"href": f"{base_url}/v1/readiness", "type": "application/json", "title": "readiness"},
                ],
            }
        ]
    }


_CATALOG_RESPONSES = {
    200: {"description": "RFC 9264 linkset", "content": {"application/linkset+json": {"schema": {"type": "object", "required": ["linkset"]}}}}
}


@router.get("/.well-known/api-catalog", response_class=LinksetResponse, responses=_CATALOG_RESPONSES)
def get_api_catalog(service: ServiceDep):
    """RFC 9727 API catalog: links to the OpenAPI document (service-desc), the docs
    (service-doc) and health (status). No key."""
    base = service.storage.base_url
    return LinksetResponse(api_catalog(base, [*service.registry.models, *workflows.WORKFLOWS]), headers=_catalog_headers(base))


@router.head("/.well-known/api-catalog", include_in_schema=False)
def head_api_catalog(service: ServiceDep):
    return Response(headers=_catalog_headers(service.storage.base_url))


def _catalog_headers(base_url: str) -> dict[str, str]:
    return {"Content-Type": f'application/linkset+json; profile="{CATALOG_PROFILE}"', "Link": catalog_link(base_url)}


def render_doc(page: str, base_url: str) -> str:
    # Docs use {{BASE_URL}} where a copy-pasteable address helps.
    return (DOCS_DIR / page).read_text().replace("{{BASE_URL}}", base_url)


@router.get("/v1/agent-skill.md", response_class=MarkdownResponse)
@router.get("/.well-known/agent-skill.md", response_class=MarkdownResponse)
def agent_skill(service: ServiceDep):
    """Step-by-step instructions for an AI agent calling this service. No key."""
    return MarkdownResponse(render_doc("agent-skill.md", service.storage.base_url))


@router.get("/v1/docs/{page}", response_class=MarkdownResponse)
def doc_page(page: str, service: ServiceDep):
    """The service's markdown docs: runs-api.md, workflows.md, other-surfaces.md, agent-skill.md. No key."""
    if page not in DOC_PAGES:
        raise NotFound(f"no doc page {page!r}; pages: {', '.join(DOC_PAGES)}")
    return MarkdownResponse(render_doc(page, service.storage.base_url))
