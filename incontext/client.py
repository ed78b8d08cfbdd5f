"""Python client for an incontext server (or any API with the same run shape).

    from incontext.client import Client
    with Client("http://127.0.0.1:8000", api_key="ic_live_…") as client:
        run = client.run("flux-pro/kontext", {"prompt": "make the sky pink", "image_url": url})
        png = client.download(run["output"]["image_urls"][0])

`run` submits, polls until the run ends, and returns the run (a dict, as the API sends it);
`events` follows a run's Server-Sent Events instead (steps, previews, the end) for a progress bar;
it raises `RunFailed` or `RunCanceled` for those ends, `RunTimeout` if none came in time,
and `APIError` (with `.code` and `.status_code`) when the server refuses a request.
`AsyncClient` has the same methods, awaitable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "canceled", "cancelled")


class APIError(Exception):
    """The server answered with an error body `{code, message, errors}`."""

    def __init__(self, status_code: int, code: str, message: str, errors: list | None = None, headers: dict | None = None):
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.errors = errors or []
        self.headers = headers or {}


class RunError(Exception):
    def __init__(self, run: dict, message: str):
        super().__init__(message)
        self.run = run


class RunFailed(RunError):
    @property
    def failure_code(self) -> str | None:
        return self.run.get("failure_code")


class RunCanceled(RunError):
    pass


class RunTimeout(TimeoutError):
    def __init__(self, run: dict, timeout: float):
        super().__init__(f"run {run['id']} still {run['status_code']} after {timeout:g} s")
        self.run = run


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        body = response.json()
        code, message, errors = body["code"], body.get("message", ""), body.get("errors")
    except (ValueError, KeyError, TypeError):
        code, message, errors = f"HTTP_{response.status_code}", response.text[:500], None
    raise APIError(response.status_code, code, message, errors, dict(response.headers))


def _outcome(run: dict) -> dict:
    status = run["status_code"]
    if status == "succeeded":
        return run
    if status == "failed":
        raise RunFailed(run, f"run {run['id']} failed: {run.get('failure_code')}: {run.get('failure_message')}")
    raise RunCanceled(run, f"run {run['id']} was canceled")


def _run_body(input: dict, metadata: dict | None, callback_url: str | None, client_ref: str | None) -> dict:
    body: dict[str, Any] = {"input": input}
    for name, value in (("metadata", metadata), ("callback_url", callback_url), ("client_ref", client_ref)):
        if value is not None:
            body[name] = value
    return body


def _decode_data_uri(url: str) -> bytes | None:
    if not url.startswith("data:"):
        return None
    return base64.b64decode(url.partition(",")[2])


def _throttled(e: APIError) -> float | None:
    """Seconds to wait before polling again if the server refused a read as too many
    (429 RATE_LIMITED, with Retry-After); None for any other error."""
    if e.status_code != 429:
        return None
    try:
        return max(float((e.headers or {}).get("retry-after", 1)), 0.1)
    except ValueError:
        return 1.0


def parse_sse(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """Server-Sent Events from a stream's lines: {"event", "data", and "id" if sent} each;
    comments and id-less retry lines are skipped."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "event" in event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            event[name] = event[name] + "\n" + value if name == "data" and "data" in event else value


def _next_delay(delay: float, poll_interval: float) -> float:
    # Start quick (short runs end in well under a second), then settle at poll_interval.
    return min(delay * 1.5, poll_interval)


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0, http: httpx.Client | None = None):
        api_key = api_key or os.environ.get("INCONTEXT_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(self, model_id: str, input: dict, *, metadata: dict | None = None, callback_url: str | None = None,
               client_ref: str | None = None, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = _run_body(input, metadata, callback_url, client_ref)
        return _check(self._http.post(f"/v1/models/{model_id}/runs", json=body, headers=headers))

    def get(self, run_id: str) -> dict:
        return _check(self._http.get(f"/v1/runs/{run_id}"))

    def cancel(self, run_id: str) -> dict:
        return _check(self._http.post(f"/v1/runs/{run_id}/cancel"))

    def logs(self, run_id: str) -> list[dict]:
        return _check(self._http.get(f"/v1/runs/{run_id}/logs"))["items"]

    def events(self, run_id: str, *, timeout: float = 300.0) -> Iterator[tuple[str, dict]]:
        """The run's event stream (`GET /v1/runs/{id}/events`): ("queued" | "running" | "step",
        data) pairs, then ("end", run) and no more. A dropped connection is resumed with
        Last-Event-ID, so no step comes twice. Raises APIError as `get` does, RunTimeout after
        `timeout` seconds."""
        deadline, last_id = time.monotonic() + timeout, None
        # The server sends a comment every 15 s on a quiet stream: a minute of silence is a dead one.
        read_timeout = httpx.Timeout(60.0, connect=10.0)
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self._http.stream("GET", f"/v1/runs/{run_id}/events", headers=headers, timeout=read_timeout) as response:
                    if not response.is_success:
                        response.read()
                        _check(response)
                    for event in parse_sse(response.iter_lines()):
                        last_id = event.get("id", last_id)
                        yield event["event"], json.loads(event["data"])
                        if event["event"] == "end":
                            return
                        if time.monotonic() >= deadline:
                            raise RunTimeout(self.get(run_id), timeout)
            except httpx.TransportError:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.2)

    def wait(self, run_id: str, *, timeout: float = 300.0, poll_interval: float = 1.0) -> dict:
        """Poll until the run ends; returns it if it succeeded, else raises RunFailed/RunCanceled."""
        deadline, delay = time.monotonic() + timeout, 0.1
        while True:
            try:
                run = self.get(run_id)
            except APIError as e:
                if (wait := _throttled(e)) is None or time.monotonic() + wait >= deadline:
                    raise
                time.sleep(wait)
                continue
            if run["status_code"] in TERMINAL:
                return _outcome(run)
            if time.monotonic() >= deadline:
                raise RunTimeout(run, timeout)
            time.sleep(delay)
            delay = _next_delay(delay, poll_interval)

    def run(self, model_id: str, input: dict, *, timeout: float = 300.0, poll_interval: float = 1.0, **submit_kwargs) -> dict:
        run = self.submit(model_id, input, **submit_kwargs)
        return self.wait(run["id"], timeout=timeout, poll_interval=poll_interval)

    def download(self, url: str) -> bytes:
        """An output's bytes: fetched from its (signed) URL, or decoded from a data URI."""
        data = _decode_data_uri(url)
        if data is not None:
            return data
        response = self._http.get(url)
        if not response.is_success:
            _check(response)
        return response.content


class AsyncClient:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0, http: httpx.AsyncClient | None = None):
        api_key = api_key or os.environ.get("INCONTEXT_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def submit(self, model_id: str, input: dict, *, metadata: dict | None = None, callback_url: str | None = None,
                     client_ref: str | None = None, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = _run_body(input, metadata, callback_url, client_ref)
        return _check(await self._http.post(f"/v1/models/{model_id}/runs", json=body, headers=headers))

    async def get(self, run_id: str) -> dict:
        return _check(await self._http.get(f"/v1/runs/{run_id}"))

    async def cancel(self, run_id: str) -> dict:
        return _check(await self._http.post(f"/v1/runs/{run_id}/cancel"))

    async def logs(self, run_id: str) -> list[dict]:
        return _check(await self._http.get(f"/v1/runs/{run_id}/logs"))["items"]

    async def wait(self, run_id: str, *, timeout: float = 300.0, poll_interval: float = 1.0) -> dict:
        deadline, delay = time.monotonic() + timeout, 0.1
        while True:
            try:
                run = await self.get(run_id)
            except APIError as e:
                if (wait := _throttled(e)) is None or time.monotonic() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)
                continue
            if run["status_code"] in TERMINAL:
                return _outcome(run)
            if time.monotonic() >= deadline:
                raise RunTimeout(run, timeout)
            await asyncio.sleep(delay)
            delay = _next_delay(delay, poll_interval)

    async def run(self, model_id: str, input: dict, *, timeout: float = 300.0, poll_interval: float = 1.0, **submit_kwargs) -> dict:
        run = await self.submit(model_id, input, **submit_kwargs)
        return await self.wait(run["id"], timeout=timeout, poll_interval=poll_interval)

    async def download(self, url: str) -> bytes:
        data = _decode_data_uri(url)
        if data is not None:
            return data
        response = await self._http.get(url)
        if not response.is_success:
            _check(response)
        return response.content
