"""The event stream (`GET /v1/runs/{id}/events`) and the lineage of multi-turn edits, over
HTTP against the real server and engine (tiny model, 4 steps unless asked)."""

from __future__ import annotations

import asyncio
import json

import httpx

from incontext.engine import preview
from incontext.engine.protocol import StepProgress
from incontext.service.progress import RunProgress

from .helpers import data_uri, png_bytes, wait_run

MODEL = "flux-pro/kontext"


def submit(api, **input_) -> dict:
    body = {"input": {"prompt": "make the square green", "image_url": data_uri(), **input_}}
    r = api.post(f"/v1/models/{MODEL}/runs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def events(api, run_id: str, last_event_id: str | None = None) -> list[dict]:
    """Every event of the stream until the server closes it: {id, event, data}."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    got, event = [], {}
    with api.stream("GET", f"/v1/runs/{run_id}/events", headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if "event" in event:
                    got.append({**event, "data": json.loads(event["data"])})
                event = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                event[name] = value
    return got


def test_a_stream_shows_every_step_with_previews_then_the_end(api):
    run = submit(api, num_inference_steps=8, seed=3)
    got = events(api, run["id"])
    steps = [e for e in got if e["event"] == "step"]
    end = got[-1]
    # Snapshots (running) come first and carry no id; a run that ended before the stream
    # connected has none, and still every step.
    assert all(e["event"] in ("queued", "running") and "id" not in e for e in got[: got.index(steps[0])])
    assert [e["data"]["step"] for e in steps] == list(range(1, 9)) and {e["data"]["total_steps"] for e in steps} == {8}
    assert [int(e["id"]) for e in steps] == list(range(1, 9))
    previews = [e["data"]["step"] for e in steps if e["data"]["preview"]]
    assert len(previews) == 4 and previews == [d for d in range(1, 9) if preview.due(d, 8, 4)]  # evenly spaced
    assert steps[previews[0] - 1]["data"]["preview"].startswith("data:image/png;base64,")
    assert end["event"] == "end" and int(end["id"]) == 9
    assert end["data"]["id"] == run["id"] and end["data"]["status_code"] == "succeeded"
    assert end["data"]["output"]["image_urls"] and end["data"]["output"]["seed"] == 3


def test_last_event_id_resumes_after_that_event(api):
    run = submit(api, num_inference_steps=6)
    wait_run(api, run["id"])
    resumed = events(api, run["id"], last_event_id="4")
    assert [(e["event"], int(e["id"])) for e in resumed] == [("step", 5), ("step", 6), ("end", 7)]
    assert events(api, run["id"], last_event_id="7") == []  # it already has the end
    # A stream of an ended run is its end, as polling would show it.
    full = events(api, run["id"])
    assert full[-1]["data"] == {**api.get(f"/v1/runs/{run['id']}").json(), "output": full[-1]["data"]["output"]}


def test_streams_need_the_runs_own_key(api, server):
    run = submit(api)
    assert httpx.get(f"{server.url}/v1/runs/{run['id']}/events").status_code == 401
    with server.client(server.keys[1]) as bob:
        r = bob.get(f"/v1/runs/{run['id']}/events")
        assert r.status_code == 404 and r.json()["code"] == "RUN_NOT_FOUND"
    assert api.get("/v1/runs/no-such-run/events").status_code == 404


def test_a_canceled_run_ends_its_stream(api):
    run = submit(api, num_inference_steps=50)
    with api.stream("GET", f"/v1/runs/{run['id']}/events", timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("retry:")
        api.post(f"/v1/runs/{run['id']}/cancel")
        rest = "\n".join(lines)
    assert "event: end" in rest and '"status_code":"canceled"' in rest


def test_lineage_is_the_whole_tree_with_prompts_sources_and_outputs(api, server):
    first = wait_run(api, submit(api, prompt="turn one")["id"])
    url = first["output"]["image_urls"][0]
    second = wait_run(api, submit(api, prompt="turn two", image_url=url)["id"])
    third = wait_run(api, submit(api, prompt="turn three", image_url=second["output"]["image_urls"][0])["id"])
    branch = wait_run(api, submit(api, prompt="a branch", image_url=url)["id"])

    tree = api.get(f"/v1/runs/{third['id']}/lineage").json()
    assert tree["run_id"] == third["id"] and tree["root_id"] == first["id"] and not tree["truncated"]
    assert tree["path"] == [first["id"], second["id"], third["id"]]
    items = {i["id"]: i for i in tree["items"]}
    assert [i["id"] for i in tree["items"]] == [first["id"], second["id"], third["id"], branch["id"]]
    assert items[branch["id"]]["parent_run_id"] == first["id"] and items[branch["id"]]["prompt"] == "a branch"
    # An upload: the server keeps the input as long as the outputs, so turn 1 has a "before".
    uploaded = api.get(items[first["id"]]["source_url"])
    assert uploaded.status_code == 200 and uploaded.headers["content-type"] == "image/png"
    assert uploaded.content == png_bytes()  # the file inside the data URI, as sent
    source = items[second["id"]]["source_url"]
    assert source.split("?")[0] == url.split("?")[0] and api.get(source).status_code == 200
    assert items[third["id"]]["output"]["image_urls"] and items[third["id"]]["status_code"] == "succeeded"
    # From any run of the tree, the same tree.
    assert [i["id"] for i in api.get(f"/v1/runs/{branch['id']}/lineage").json()["items"]] == list(items)
    with server.client(server.keys[1]) as bob:
        assert bob.get(f"/v1/runs/{third['id']}/lineage").status_code == 404


def test_progress_wakes_waiters_and_forgets_old_runs():
    async def go():
        hub = RunProgress(max_runs=2, keep_ended_s=0)
        hub.bind(asyncio.get_running_loop())
        waiting = asyncio.ensure_future(hub.wait("a", 0, timeout=5))
        await asyncio.sleep(0)
        await asyncio.to_thread(hub.publish, "a", StepProgress(1, 2))
        woke = await waiting
        timed_out = await hub.wait("a", 1, timeout=0.01)
        hub.ended("a")
        ended = await hub.wait("a", 1, timeout=5)
        for run_id in ("b", "c"):
            hub.publish(run_id, StepProgress(1, 2))
        return woke, timed_out, ended, hub.last_id("a"), hub.last_id("c")

    assert asyncio.run(go()) == ("step", "timeout", "ended", 0, 1)
