"""incontext.client against the real server."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from PIL import Image

from .helpers import data_uri, wait_for
from incontext.client import APIError, AsyncClient, Client, RunCanceled

MODEL = "flux-pro/kontext"


def test_client_run_and_download(server):
    with Client(server.url, server.keys[0]) as client:
        run = client.run(MODEL, {"prompt": "p", "image_url": data_uri(), "output_format": "png"}, timeout=240, client_ref="sdk")
        assert run["status_code"] == "succeeded" and run["client_ref"] == "sdk"
        img = Image.open(io.BytesIO(client.download(run["output"]["image_urls"][0])))
        assert img.format == "PNG"
        synced = client.run(MODEL, {"prompt": "p", "image_url": data_uri(), "sync_mode": True}, timeout=240)
        assert Image.open(io.BytesIO(client.download(synced["output"]["image_urls"][0]))).format == "JPEG"


def test_client_errors_are_typed(server):
    with Client(server.url, "ic_live_nope") as client:
        with pytest.raises(APIError) as err:
            client.get("anything")
        assert (err.value.status_code, err.value.code) == (401, "UNAUTHORIZED")
    with Client(server.url, server.keys[0]) as client:
        with pytest.raises(APIError) as err:
            client.submit(MODEL, {"prompt": "p", "image_url": data_uri(), "num_images": 9})
        assert err.value.code == "VALIDATION_ERROR" and err.value.errors[0]["field"] == "input.num_images"
        with pytest.raises(APIError) as err:
            client.get("01a20ae6-9d8b-772c-acf2-5cbc80614e72")
        assert (err.value.status_code, err.value.code) == (404, "RUN_NOT_FOUND")


def test_client_run_raises_when_canceled(server):
    with Client(server.url, server.keys[0]) as client:
        run = client.submit(MODEL, {"prompt": "p", "image_url": data_uri(), "num_inference_steps": 50, "num_images": 4})
        canceler = threading.Thread(
            target=lambda: (wait_for(lambda: client.get(run["id"])["status_code"] == "running", timeout=120), client.cancel(run["id"]))
        )
        canceler.start()
        with pytest.raises(RunCanceled):
            client.wait(run["id"], timeout=240, poll_interval=0.1)
        canceler.join()


def test_async_client(server):
    async def main():
        async with AsyncClient(server.url, server.keys[0]) as client:
            runs = await asyncio.gather(*(client.run(MODEL, {"prompt": f"p{i}", "image_url": data_uri()}, timeout=240) for i in range(2)))
            assert all(r["status_code"] == "succeeded" for r in runs)
            assert len(await client.download(runs[0]["output"]["image_urls"][0])) > 0
            with pytest.raises(APIError):
                await client.cancel(runs[0]["id"])  # already ended: 409

    asyncio.run(main())


def _throttling_server(reads: list[int]):
    """A server that refuses the second read as too many (429, Retry-After), then succeeds."""
    import httpx

    def handle(request: httpx.Request) -> httpx.Response:
        reads.append(1)
        if len(reads) == 2:
            return httpx.Response(429, json={"code": "RATE_LIMITED", "message": "too many reads"}, headers={"Retry-After": "0.1"})
        status = "running" if len(reads) == 1 else "succeeded"
        return httpx.Response(200, json={"id": "r1", "status_code": status, "output": {"outputs": []}})

    return httpx.MockTransport(handle)


def test_wait_backs_off_when_reads_are_rate_limited():
    import httpx

    reads: list[int] = []
    client = Client("http://test", "k", http=httpx.Client(base_url="http://test", transport=_throttling_server(reads)))
    assert client.wait("r1", timeout=5)["status_code"] == "succeeded"
    assert len(reads) == 3


def test_async_wait_backs_off_when_reads_are_rate_limited():
    import httpx

    reads: list[int] = []
    client = AsyncClient("http://test", "k", http=httpx.AsyncClient(base_url="http://test", transport=_throttling_server(reads)))
    assert asyncio.run(client.wait("r1", timeout=5))["status_code"] == "succeeded"
    assert len(reads) == 3


def test_a_rate_limited_wait_past_its_deadline_raises_the_refusal():
    import httpx

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"code": "RATE_LIMITED", "message": "too many reads"}, headers={"Retry-After": "30"})

    client = Client("http://test", "k", http=httpx.Client(base_url="http://test", transport=httpx.MockTransport(handle)))
    with pytest.raises(APIError) as e:
        client.wait("r1", timeout=1)
    assert e.value.status_code == 429 and e.value.code == "RATE_LIMITED"
