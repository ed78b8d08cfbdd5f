"""Discovery over HTTP against the real server: readiness, models and their specs, the
OpenAPI document, the RFC 9727 catalog, docs and the agent skill."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from incontext.service.routes import discovery

from .helpers import data_uri, wait_for

MODEL = "flux-pro/kontext"


def test_health_and_readiness_need_no_key(server):
    assert httpx.get(f"{server.url}/v1/health").json() == {"ok": True}

    def ready() -> httpx.Response | None:
        r = httpx.get(f"{server.url}/v1/readiness")
        return r if r.status_code == 200 else None

    # The server answers while the engine process still loads the model: ready once it has.
    r = wait_for(ready, timeout=300)
    body = r.json()
    assert body["ok"] is True and body["status"] == "ready"
    assert set(body["checks"]) == {"database", "storage", "model"}
    assert all(c["ok"] and c["latency_ms"] >= 0 for c in body["checks"].values())
    assert body["checks"]["storage"]["detail"]["free_bytes"] > 0


def test_readiness_is_503_when_a_component_fails(tmp_path: Path):
    """In-process, with a service whose database is down and whose model is still loading."""

    def broken_sessions():
        raise ConnectionError("db host 10.0.0.5 refused user admin")

    fake = SimpleNamespace(
        sessions=broken_sessions,
        storage=SimpleNamespace(inputs=tmp_path, outputs=tmp_path),
        engine=SimpleNamespace(is_ready=lambda: False),
        registry=SimpleNamespace(default_id="incontext/nano"),
    )
    app = FastAPI()
    app.include_router(discovery.router)
    app.state.service = fake
    r = TestClient(app).get("/v1/readiness")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert r.json()["status"] == "not_ready"
    assert checks["database"] == {"ok": False, "latency_ms": checks["database"]["latency_ms"], "error": "ConnectionError", "detail": {}}
    assert checks["storage"]["ok"] is True
    assert checks["model"]["ok"] is False and checks["model"]["error"] == "the model is still loading"


def test_models_list_and_detail_are_public(server):
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 200
    items = r.json()["items"]
    default = next(m for m in items if m["default"])
    assert MODEL in default["aliases"] and "black-forest-labs/flux-pro/kontext" in default["aliases"]
    assert default["price_per_image"] == "0.04" and default["currency"] == "USD"
    assert "inputs" not in default  # detail only
    # The tiny random model declares no licence and has no published name: not known, said as null.
    assert default["license"] == {"name": "unknown", "commercial_use": None, "url": None}
    assert default["links"]["llms_txt"].endswith(f"/v1/models/{default['id']}/llms.txt")

    for model_id in (MODEL, "black-forest-labs/flux-pro/kontext", default["id"]):
        detail = httpx.get(f"{server.url}/v1/models/{model_id}").json()
        assert detail["id"] == default["id"]
    inputs = {i["name"]: i for i in detail["inputs"]}
    assert inputs["prompt"]["required"] and inputs["prompt"]["type"] == "string" and inputs["prompt"]["max_length"] == 4000
    assert inputs["image_url"]["one_of"] == ["image_url", "image_urls"] and inputs["image_url"]["type"] == "string"
    assert (inputs["image_urls"]["type"], inputs["image_urls"]["max_items"]) == ("array", 4)
    g = inputs["guidance_scale"]
    assert (g["type"], g["minimum"], g["maximum"], g["default"]) == ("number", 1, 20, 3.5)
    assert (inputs["num_images"]["minimum"], inputs["num_images"]["maximum"], inputs["num_images"]["default"]) == (1, 4, 1)
    assert inputs["num_inference_steps"]["default"] == 4  # the tiny model's preset, not the schema's null
    assert {"16:9", "1:1", "9:21", "match_input_image"} <= set(inputs["aspect_ratio"]["enum"])
    assert inputs["safety_tolerance"]["enum"] == ["1", "2", "3", "4", "5", "6"]
    assert inputs["output_format"]["enum"] == ["jpeg", "png"] and inputs["output_format"]["default"] == "jpeg"
    assert detail["input_schema"]["required"] == ["prompt"] and len(detail["input_schema"]["oneOf"]) == 2

    r = httpx.get(f"{server.url}/v1/models/no/such/model")
    assert r.status_code == 404 and r.json()["code"] == "MODEL_NOT_FOUND"


def test_published_ranges_are_the_enforced_ones(server, api):
    """Each published bound is accepted and one step beyond it is refused by run creation."""
    inputs = httpx.get(f"{server.url}/v1/models/{MODEL}").json()["inputs"]
    for entry in inputs:
        for bound, beyond in (("minimum", -1), ("maximum", +1)):
            if entry.get(bound) is None or entry["name"] == "seed":
                continue
            value = entry[bound] + beyond
            r = api.post(f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "x", "image_url": "data:,", entry["name"]: value}})
            assert r.status_code == 422, (entry["name"], value)
            assert f"input.{entry['name']}" in {e["field"] for e in r.json()["errors"]}
    r = api.post(f"/v1/models/{MODEL}/runs", json={"input": {"prompt": "x", "image_url": data_uri(), "safety_tolerance": "7"}})
    assert r.status_code == 422


def test_llms_txt_is_a_usable_markdown_spec(server):
    r = httpx.get(f"{server.url}/v1/models/{MODEL}/llms.txt")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    text = r.text
    assert text.startswith(f"# {MODEL}\n")
    assert f"curl -sS -X POST {server.url}/v1/models/{MODEL}/runs" in text
    for name in ("prompt", "image_url", "guidance_scale", "num_images", "aspect_ratio", "seed"):
        assert f"| `{name}` |" in text
    for status in ("queued", "dispatching", "running", "succeeded", "failed", "canceled"):
        assert f"| `{status}` |" in text
    assert "callback_url" in text and "Runflow-Signature" in text and f"{server.url}/v1/runs/$RUN_ID" in text
    assert "- Licence of the weights: unknown (commercial use not known)" in text and "AI-generated" in text
    assert httpx.get(f"{server.url}/v1/models/nope/llms.txt").status_code == 404


def test_openapi_is_complete_and_valid(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert spec["openapi"].startswith("3.1") and spec["info"]["title"] == "incontext" and spec["info"]["version"]
    assert spec["servers"] == [{"url": server.url}]
    expected = {
        "/v1/health", "/v1/readiness", "/v1/models", "/v1/models/{model_id}", "/v1/models/{model_id}/llms.txt",
        "/v1/models/{model_id}/runs", "/v1/models/{model_id}/batches", "/v1/runs", "/v1/runs/{run_id}",
        "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/logs", "/.well-known/api-catalog", "/v1/agent-skill.md",
        "/v1/flux-kontext-pro", "/v1/get_result", "/v1/images/edits", "/v1/files/{relpath}", "/v1/auth/me",
    }
    assert expected <= set(spec["paths"])

    # Every $ref resolves; operation ids are unique; path templates match declared parameters.
    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in set(refs(spec)):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in spec["components"]["schemas"], ref
    op_ids = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert method in {"get", "post", "put", "patch", "delete", "head", "options"}
            op_ids.append(op["operationId"])
            assert op["responses"], (method, path)
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)
            for scheme in op.get("security", []):
                assert set(scheme) <= set(spec["components"]["securitySchemes"])
    assert len(op_ids) == len(set(op_ids))

    # Security mirrors the code: keyed routes say so, discovery routes do not.
    paths = spec["paths"]
    assert paths["/v1/runs"]["get"]["security"] == [{"bearer": []}]
    assert {"xKey": []} in paths["/v1/flux-kontext-pro"]["post"]["security"]
    for public in ("/v1/health", "/v1/readiness", "/v1/models", "/v1/models/{model_id}", "/.well-known/api-catalog"):
        assert "security" not in paths[public]["get"], public
    # The documented error bodies are the real ones.
    create = paths["/v1/models/{model_id}/runs"]["post"]["responses"]
    assert create["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    # A model's licence is documented field by field, null included.
    license_ = spec["components"]["schemas"]["ModelLicense"]
    assert license_["required"] == ["name", "commercial_use", "url"] and {"type": "null"} in license_["properties"]["commercial_use"]["anyOf"]
    assert "multipart/form-data" in paths["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert "4XX" in paths["/v1/images/edits"]["post"]["responses"]


def test_api_catalog_links_resolve(server):
    r = httpx.get(f"{server.url}/.well-known/api-catalog")
    assert r.status_code == 200
    assert r.headers["content-type"] == 'application/linkset+json; profile="https://www.rfc-editor.org/info/rfc9727"'
    assert r.headers["link"] == f'<{server.url}/.well-known/api-catalog>; rel="api-catalog"'
    (entry,) = r.json()["linkset"]
    assert entry["anchor"] == f"{server.url}/v1"
    (desc,) = entry["service-desc"]
    assert desc["href"] == f"{server.url}/openapi.json" and desc["type"].startswith("application/vnd.oai.openapi+json")
    assert "openapi" in httpx.get(desc["href"]).json()
    doc_types = {d["href"]: d["type"] for d in entry["service-doc"]}
    assert f"{server.url}/docs" in doc_types and f"{server.url}/v1/agent-skill.md" in doc_types
    assert any(href.endswith("/llms.txt") for href in doc_types)
    for href, kind in doc_types.items():
        got = httpx.get(href)
        assert got.status_code == 200, href
        assert got.headers["content-type"].startswith(kind), href
    statuses = {s["href"] for s in entry["status"]}
    assert f"{server.url}/v1/health" in statuses
    for href in statuses:
        assert httpx.get(href).status_code == 200

    head = httpx.head(f"{server.url}/.well-known/api-catalog")
    assert head.status_code == 200 and head.content == b"" and "api-catalog" in head.headers["link"]


def test_agent_skill_and_docs(server):
    for path in ("/v1/agent-skill.md", "/.well-known/agent-skill.md", "/v1/docs/agent-skill.md"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown"), path
        text = r.text
        assert text.startswith("---\nname: ") and "{{BASE_URL}}" not in text
        assert f"curl -sS -X POST {server.url}/v1/models/flux-pro/kontext/runs" in text
        assert f"{server.url}/v1/auth/me" in text
    for page in ("runs-api.md", "other-surfaces.md"):
        assert httpx.get(f"{server.url}/v1/docs/{page}").status_code == 200
    r = httpx.get(f"{server.url}/v1/docs/../app.py")
    assert r.status_code == 404
    assert httpx.get(f"{server.url}/v1/docs/secret_key").status_code == 404


def test_preserve_and_return_mask_are_published_on_every_surface(server):
    """The model card, llms.txt and OpenAPI list both fields with their defaults and values."""
    inputs = {i["name"]: i for i in httpx.get(f"{server.url}/v1/models/{MODEL}").json()["inputs"]}
    assert (inputs["preserve"]["type"], inputs["preserve"]["default"], inputs["preserve"]["enum"]) == ("string", "auto", ["auto", "off"])
    assert (inputs["return_mask"]["type"], inputs["return_mask"]["default"]) == ("boolean", False)
    text = httpx.get(f"{server.url}/v1/models/{MODEL}/llms.txt").text
    assert "| `preserve` | string | auto | `auto` `off` |" in text and "| `return_mask` | boolean | false |" in text
    assert "changed_share" in text and "mask_url" in text

    spec = httpx.get(f"{server.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def body_schema(path: str, media: str) -> dict:
        ref = spec["paths"][path]["post"]["requestBody"]["content"][media]["schema"]["$ref"]
        return schemas[ref.split("/")[-1]]

    runflow = schemas[body_schema("/v1/models/{model_id}/runs", "application/json")["properties"]["input"]["$ref"].split("/")[-1]]
    bfl = body_schema("/v1/flux-kontext-pro", "application/json")
    openai = body_schema("/v1/images/edits", "multipart/form-data")
    for name, schema in (("runflow", runflow), ("bfl", bfl), ("openai", openai)):
        preserve, mask = schema["properties"]["preserve"], schema["properties"]["return_mask"]
        assert (preserve["enum"], preserve["default"]) == (["auto", "off"], "auto"), name
        assert (mask["type"], mask["default"]) == ("boolean", False), name
