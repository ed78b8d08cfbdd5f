"""INCONTEXT_LOG_FORMAT=json: `incontext serve` writes one JSON object a line, and the lines
the dispatcher writes about a run carry that run's id; those of the HTTP request that
created it carry the request's id."""

from __future__ import annotations

import io
import json
import logging

import pytest

from incontext.service import logs

from .helpers import Server, create_key, data_uri, server_env, wait_for, wait_run


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    srv = Server(tmp_path_factory.mktemp("logs"), server_env(tiny_model, INCONTEXT_LOG_FORMAT="json"))
    key = create_key(srv.data_dir)
    srv.start()
    yield srv, key
    srv.stop()


def records(srv: Server) -> list[dict]:
    """The server's lines, its engine child's included ("process": "engine"), parsed."""
    lines = [line for line in srv.log().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


def test_every_line_is_json_and_the_dispatchers_lines_for_a_run_carry_its_id(served):
    srv, key = served
    with srv.client(key) as api:
        r = api.post("/v1/models/flux-pro/kontext/runs", json={"input": {"prompt": "make the square green", "image_url": data_uri()}})
        assert r.status_code == 201, r.text
        run = wait_run(api, r.json()["id"])
    assert run["status_code"] == "succeeded", run

    def about_the_run() -> list[dict]:
        ours = [rec for rec in records(srv) if rec["logger"] == "incontext.service.dispatcher" and run["id"] in rec["message"]]
        return ours if any("succeeded" in rec["message"] for rec in ours) else []

    ours = wait_for(about_the_run, timeout=30)
    assert [rec["message"].split(": ")[1].split(" ")[0] for rec in ours] == ["claimed", "succeeded"]
    assert all(rec["run_id"] == run["id"] and rec["level"] == "INFO" and rec["time"] for rec in ours)
    # uvicorn's access line for the POST went through the same handler, with the request's id.
    (post,) = [rec for rec in records(srv) if rec["logger"] == "uvicorn.access" and "POST /v1/models/flux-pro/kontext/runs" in rec["message"]]
    assert post["request_id"] == run["request_id"]
    # Lines about no run carry no run_id at all (not a null).
    assert any(rec["logger"] == "incontext.service.app" and "run_id" not in rec for rec in records(srv))
    # The engine's child process writes JSON lines too, marked as its own.
    assert any(rec.get("process") == "engine" for rec in records(srv)), [rec["message"] for rec in records(srv)][:20]


def test_a_record_keeps_its_own_run_id_and_a_bound_one_reaches_every_logger():
    """The filter the server's handler has: the bound run unless the record names its own."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.json_formatter())
    logger = logging.getLogger("incontext.test_logs")
    logger.addHandler(handler)
    try:
        token = logs.run_id.set("run-a")
        logger.warning("about a")
        logger.warning("about b", extra={"run_id": "run-b"})
        logs.run_id.reset(token)
        logger.warning("about none")
    finally:
        logger.removeHandler(handler)
    assert [json.loads(line).get("run_id") for line in stream.getvalue().splitlines()] == ["run-a", "run-b", None]
