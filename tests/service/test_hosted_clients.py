"""The official client libraries of the hosted APIs, unchanged, against the real server on
loopback: only the base URL (or host) and the key differ from what their users run.

- replicate 1.0.7: run (Prefer: wait) by owner/name and by owner/name:version, versions.list,
  predictions.create(version=…) and an unknown version, models.predictions.create with webhooks
  (a webhook_events_filter and none: start, logs, output, completed in order), wait/reload,
  progress from logs, predictions.get/list/cancel, webhooks.default.secret + webhooks.validate
  of every webhook, and its error type.
- fal-client 1.0.3: submit, status (with logs), result, subscribe, run, submit with a
  webhook_url (fal_webhook, received and verified), cancel, its error type; over HTTPS (fal-client speaks nothing else) to a TLS listener whose CA is made here.
- openai: images.edit and models.list.
- blackforest: generate (async, then get_polling_result).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from .helpers import Receiver, Server, create_key, data_uri, free_port, png_bytes, server_env, wait_for
from .test_callbacks import verify_standard_webhook


# Replicate.
def test_replicate_client_runs_predicts_cancels_and_verifies_webhooks(server):
    replicate = pytest.importorskip("replicate")
    key = server.keys[1]
    client = replicate.Client(api_token=key, base_url=server.url)
    kontext = "black-forest-labs/flux-kontext-pro"
    image = data_uri(png_bytes((96, 64)))

    # run(): one call, answered when done (Prefer: wait); the output is one URL.
    output = client.run(kontext, input={"prompt": "make it blue", "input_image": image, "output_format": "png", "seed": 7})
    url = str(output)
    assert httpx.get(url).headers["content-type"] == "image/png"

    # run() of owner/name:version: POST /v1/predictions {version}, then GET …/versions/{id}.
    (listed,) = replicate.version.Versions(client, model=kontext).list().results
    output = client.run(f"{kontext}:{listed.id}", input={"prompt": "make it blue", "input_image": image, "seed": 7})
    assert str(output).startswith("http") and len(listed.id) == 64
    made = client.predictions.create(version=listed.id, input={"prompt": "p", "input_image": image})
    assert made.model == "flux-pro/kontext" and made.version == listed.id
    with pytest.raises(replicate.exceptions.ReplicateError) as err:
        client.predictions.create(version="0" * 64, input={"prompt": "p", "input_image": image})
    assert err.value.status == 422 and "not a model version" in err.value.detail

    receiver = Receiver()
    try:
        secret = client.webhooks.default.secret()
        filtered = client.models.predictions.create(
            model=kontext, input={"prompt": "p", "input_image": image, "aspect_ratio": "match_input_image", "output_format": "jpg"},
            webhook=f"{receiver.url}/filtered", webhook_events_filter=["start", "completed"],
        )
        assert filtered.status in ("starting", "processing") and filtered.urls["get"].endswith(filtered.id)
        assert filtered.model == kontext  # as the client named it
        every = client.models.predictions.create(model=kontext, input={"prompt": "q", "input_image": image}, webhook=f"{receiver.url}/every")
        filtered.wait()
        assert filtered.status == "succeeded" and filtered.error is None
        assert filtered.output.startswith("http") and filtered.metrics["predict_time"] > 0
        assert filtered.progress is not None and filtered.progress.percentage == 1.0  # tqdm lines in logs
        assert client.predictions.get(filtered.id).status == "succeeded"
        assert filtered.id in {p.id for p in client.predictions.list().results}
        every.wait()

        # Each prediction's events, in order, as the delivery history names them; each body
        # is the prediction at that event, signed so replicate.webhooks.validate accepts it.
        def events(prediction_id):
            with server.client(key) as api:
                return [d["event"] for d in api.get(f"/v1/runs/{prediction_id}/callback").json()]

        wait_for(lambda: len(receiver.requests) >= 2 + len(events(every.id)) and len(events(every.id)) >= 3, timeout=60)
        assert events(filtered.id) == ["start", "run.completed"]
        sent = events(every.id)
        assert sent[0] == "start" and sent[-2:] == ["output", "run.completed"] and set(sent[1:-2]) <= {"logs"}
        hooks = {path: [r for r in receiver.requests if r["path"] == path] for path in ("/filtered", "/every")}
        assert len(hooks["/filtered"]) == 2 and len(hooks["/every"]) == len(sent)
        for hook in receiver.requests:
            replicate.webhooks.validate(headers=hook["headers"], body=hook["body"].decode(), secret=secret)  # raises if not signed so
        bodies = {path: [json.loads(r["body"]) for r in reqs] for path, reqs in hooks.items()}
        assert [b["status"] for b in bodies["/filtered"]] == ["starting", "succeeded"] and bodies["/filtered"][0]["id"] == filtered.id
        assert bodies["/every"][0]["status"] == "starting" and bodies["/every"][-1]["status"] == "succeeded"
        assert bodies["/every"][-2]["output"] == bodies["/every"][-1]["output"] and bodies["/every"][-1]["output"].startswith("http")
        assert all(b["status"] == "processing" and "step" in b["logs"] for b in bodies["/every"][1:-2])
        assert "succeeded" in bodies["/every"][-1]["logs"]
        hook = receiver.requests[0]
        with pytest.raises(replicate.webhook.InvalidSignatureError):
            replicate.webhooks.validate(headers=hook["headers"], body=hook["body"].decode() + " ", secret=secret)
    finally:
        receiver.close()

    # Cancel: several queued at once, the last canceled before the engine reaches it (or, on a
    # machine fast enough to have finished it, answered as it ended).
    made = [client.models.predictions.create(model=kontext, input={"prompt": f"p{i}", "input_image": image}) for i in range(3)]
    canceled = client.predictions.cancel(made[-1].id)
    assert canceled.status in ("canceled", "succeeded")
    if canceled.status == "canceled":
        assert client.predictions.get(made[-1].id).status == "canceled"

    # Errors: Replicate's problem details, raised as its own exception.
    with pytest.raises(replicate.exceptions.ReplicateError) as err:
        client.models.predictions.create(model="nobody/nothing", input={"prompt": "p", "input_image": image})
    assert err.value.status == 404 and "unknown model" in err.value.detail
    with pytest.raises(replicate.exceptions.ReplicateError) as err:
        client.models.predictions.create(model=kontext, input={"prompt": "p"})
    assert err.value.status == 422 and "input_image" in err.value.detail


# fal.
FAL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import fal_client

    image, results = sys.argv[1], {}
    client = fal_client.SyncClient()
    app = "fal-ai/flux-pro/kontext"
    args = {"prompt": "make it blue", "image_url": image, "output_format": "png", "seed": 3}

    handle = client.submit(app, arguments=args)
    results["submitted"] = handle.request_id
    events = [type(e).__name__ for e in handle.iter_events(with_logs=True, interval=0.1)]
    results["events"] = events
    results["status"] = type(client.status(app, handle.request_id, with_logs=True)).__name__
    results["result"] = handle.get()
    results["fetched"] = client.result(app, handle.request_id)
    results["subscribed"] = client.subscribe(app, arguments=args)
    results["run"] = client.run(app, arguments=args)
    hooked = client.submit(app, arguments=args, webhook_url=sys.argv[2])
    results["hooked"] = [hooked.request_id, hooked.get()]

    handles = [client.submit(app, arguments=args) for _ in range(3)]
    try:
        handles[-1].cancel()
        results["cancel"] = "CANCELLATION_REQUESTED"
    except fal_client.client.FalClientHTTPError as exc:
        results["cancel"] = f"{exc.status_code} {exc.response.text}"
    results["canceled_status"] = type(handles[-1].status()).__name__
    try:
        client.run("fal-ai/flux-pro/nothing", arguments=args)
    except fal_client.client.FalClientHTTPError as exc:
        results["unknown"] = [exc.status_code, str(exc)]
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tiny_model):
    """The app under uvicorn with a certificate from a CA made here: how fal-client, which
    speaks only HTTPS to FAL_RUN_HOST, reaches a self-hosted server (docs/other-surfaces.md)."""
    trustme = pytest.importorskip("trustme")
    data_dir = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = data_dir / "ca.pem", data_dir / "cert.pem", data_dir / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for pem in cert.cert_chain_pems[1:]:
        cert_file.write_bytes(cert_file.read_bytes() + pem.bytes())
    cert.private_key_pem.write_to_path(str(key_file))

    port = free_port()
    env = {**os.environ, **server_env(tiny_model), "INCONTEXT_DATA_DIR": str(data_dir), "INCONTEXT_PORT": str(port),
           "INCONTEXT_PUBLIC_URL": f"https://127.0.0.1:{port}"}
    key = create_key(data_dir, "fal", env=env)
    log = open(data_dir / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "incontext.service.app:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--ssl-certfile", str(cert_file), "--ssl-keyfile", str(key_file)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url, ca_file, proc), timeout=600, interval=0.3)
        yield {"url": url, "host": f"127.0.0.1:{port}", "ca": ca_file, "key": key, "dir": data_dir}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _healthy(url, ca_file, proc) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"uvicorn exited with {proc.returncode}")
    try:
        return httpx.get(f"{url}/v1/health", verify=ssl.create_default_context(cafile=str(ca_file)), timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_fal_client_queue_run_and_cancel_over_tls(tls_server, tmp_path):
    pytest.importorskip("fal_client")
    script = tmp_path / "fal_calls.py"
    script.write_text(FAL_SCRIPT)
    env = {
        **os.environ,
        "FAL_KEY": tls_server["key"],
        "FAL_RUN_HOST": tls_server["host"],
        "FAL_QUEUE_RUN_HOST": f"{tls_server['host']}/queue",
        "SSL_CERT_FILE": str(tls_server["ca"]),  # httpx (fal-client's transport) trusts our CA
    }
    ca = ssl.create_default_context(cafile=str(tls_server["ca"]))
    secret = httpx.post(f"{tls_server['url']}/v1/callback-secrets", json={"label": "fal"}, verify=ca,
                        headers={"Authorization": f"Bearer {tls_server['key']}"}).json()["plain_secret"]
    receiver = Receiver()
    try:
        done = subprocess.run(
            [sys.executable, str(script), data_uri(png_bytes((96, 64))), f"{receiver.url}/fal"], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:] + (tls_server["dir"] / "server.log").read_text()[-3000:]
        results = json.loads(done.stdout.strip().splitlines()[-1])
        # fal_webhook: fal's body once the request ends, signed per Standard Webhooks.
        wait_for(lambda: receiver.requests, timeout=60)
    finally:
        receiver.close()
    (hook,) = receiver.requests
    body = json.loads(hook["body"])
    request_id, result = results["hooked"]
    assert body["request_id"] == body["gateway_request_id"] == request_id and body["status"] == "OK" and body["error"] is None
    assert body["payload"]["images"][0]["url"].startswith(tls_server["url"]) and body["payload"]["seed"] == result["seed"] == 3
    assert verify_standard_webhook(hook["headers"], hook["body"], secret)

    assert results["events"][-1] == "Completed" and results["status"] == "Completed"
    for name in ("result", "fetched", "subscribed", "run"):
        body = results[name]
        (image,) = body["images"]
        assert set(image) == {"url", "width", "height", "content_type"} and image["content_type"] == "image/png"
        assert body["seed"] == 3 and body["has_nsfw_concepts"] == [False] and body["prompt"] == "make it blue"
        assert image["url"].startswith(tls_server["url"])
    assert results["cancel"] == "CANCELLATION_REQUESTED" or results["cancel"].startswith("400")
    assert results["canceled_status"] == "Completed"
    assert results["unknown"][0] == 404 and "unknown model" in results["unknown"][1]


# OpenAI.
def test_openai_sdk_edits_and_lists_models(server, tmp_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys[1])
    path = tmp_path / "in.png"
    path.write_bytes(png_bytes((96, 64)))
    with path.open("rb") as f:
        result = client.images.edit(model="gpt-image-1", image=f, prompt="make it blue", size="1536x1024")
    assert result.data[0].b64_json and result.data[0].revised_prompt == "make it blue"
    ids = {m.id for m in client.models.list()}
    assert {"flux-pro/kontext", "incontext/nano"} <= ids
    with path.open("rb") as f, pytest.raises(openai.BadRequestError) as err:
        client.images.edit(model="gpt-image-1", image=f, prompt="p", size="big")
    assert err.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="gpt-image-1", prompt="p")


# Black Forest Labs.
def test_blackforest_client_generates_and_polls(server, tmp_path):
    blackforest = pytest.importorskip("blackforest", reason="blackforest pins pillow==10.4.0; install it with --no-deps to run this")
    from blackforest.types.general.client_config import ClientConfig

    client = blackforest.BFLClient(api_key=server.keys[1], base_url=server.url)
    path = tmp_path / "in.png"
    path.write_bytes(png_bytes((96, 64)))
    submitted = client.generate("flux-kontext-pro", {"prompt": "make it blue", "input_image": str(path)}, config=ClientConfig(sync=False))
    result = client.get_polling_result(submitted.id)
    assert result["sample"].startswith("http") and httpx.get(result["sample"]).status_code == 200
    started = time.monotonic()
    synced = client.generate("flux-kontext-pro", {"prompt": "again", "input_image": str(path)}, config=ClientConfig(sync=True))
    assert synced.result["sample"] and time.monotonic() - started < 300
