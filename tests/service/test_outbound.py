"""What the server fetches for a client (outbound.py): never a non-public address, in any
spelling or by any route (a name, a redirect, a name that answers differently the second
time), never longer than one deadline, never more than the size cap, and one sentence for
every failure. The resolver is a stub; the only network is loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import pytest

from incontext.errors import ImageTooLarge
from incontext.service.errors import ImageFetchFailed
from incontext.service.inputs import FETCH_FAILED, prefetch
from incontext.service.netpolicy import NetPolicy
from incontext.service.outbound import Outbound, OutboundFailed, Refused, TooLarge
from incontext.service.storage import Storage
from incontext.settings import Settings
from incontext.testing import TrickleHost

from .helpers import ImageHost, png_bytes

LOOPBACK_ONLY = NetPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))  # stands in for "public" here


class StubResolver:
    """Answers each name from a script: a list of answers, one per call (the last repeats)."""

    def __init__(self, script: dict[str, list[list[str]]]):
        self.script = script
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answers = self.script.get(host)
        if answers is None:
            raise socket.gaierror(f"no such name {host}")
        return answers[min(len(self.calls) - 1, len(answers) - 1)]


async def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"an address literal was resolved: {host}")


def get(outbound: Outbound, url: str, *, deadline_s: float = 5, max_bytes: int = 1 << 20) -> bytes:
    async def main():
        try:
            return await outbound.get(url, deadline_s=deadline_s, max_bytes=max_bytes)
        finally:
            await outbound.aclose()

    return asyncio.run(main())


@pytest.fixture
def host():
    h = ImageHost({"/a.png": (200, png_bytes())})
    yield h
    h.close()


def test_every_spelling_of_a_private_address_is_refused_without_connecting(host):
    port = host.url.rsplit(":", 1)[1]
    forms = [
        "127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
        "[2002:7f00:1::]", "169.254.169.254", "[::ffff:a9fe:a9fe]", "[64:ff9b::a9fe:a9fe]", "10.0.0.1", "192.168.1.1",
        "100.64.0.1", "224.0.0.1", "0.0.0.0", "[fe80::1]",
    ]
    for form in forms:
        with pytest.raises(Refused):
            get(Outbound(NetPolicy(), resolver=no_dns), f"http://{form}:{port}/a.png")
    assert host.requests == []


def test_names_that_resolve_to_private_addresses_are_refused(host):
    port = host.url.rsplit(":", 1)[1]
    resolver = StubResolver({
        "metadata.google.internal": [["169.254.169.254"]],
        "localhost": [["127.0.0.1", "::1"]],
        "mixed.example": [["93.184.215.14", "10.0.0.7"]],  # any private answer refuses the name
    })
    for name in resolver.script:
        with pytest.raises(Refused):
            get(Outbound(NetPolicy(), resolver=resolver), f"http://{name}:{port}/a.png")
    assert host.requests == []


def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_connected(host):
    # DNS rebinding: allowed at the check, private at a second lookup. There is no second lookup.
    port = host.url.rsplit(":", 1)[1]
    resolver = StubResolver({"img.example": [["127.0.0.1"], ["169.254.169.254"]]})
    body = get(Outbound(LOOPBACK_ONLY, resolver=resolver), f"http://img.example:{port}/a.png")
    assert body == png_bytes()
    assert resolver.calls == ["img.example"]
    assert host.requests[0]["headers"]["host"] == f"img.example:{port}"  # the original Host header


def test_a_redirect_to_a_private_address_is_refused(host):
    port = host.url.rsplit(":", 1)[1]
    host.files["/to-metadata"] = (302, b"http://169.254.169.254/latest/meta-data/")
    host.files["/to-other-loopback"] = (302, f"http://127.0.0.2:{port}/a.png".encode())
    host.files["/to-name"] = (302, f"http://rebind.example:{port}/a.png".encode())
    resolver = StubResolver({"rebind.example": [["10.0.0.1"]]})
    for path in ("/to-metadata", "/to-other-loopback", "/to-name"):
        with pytest.raises(Refused):
            get(Outbound(LOOPBACK_ONLY, resolver=resolver), f"{host.url}{path}")
    assert [r["path"] for r in host.requests] == ["/to-metadata", "/to-other-loopback", "/to-name"]


def test_a_trickling_server_is_cut_off_at_the_total_deadline():
    trickle = TrickleHost(interval_s=0.05, total=10_000)  # every read arrives well within any per-read timeout
    try:
        started = time.monotonic()
        with pytest.raises(OutboundFailed, match="not done within"):
            get(Outbound(LOOPBACK_ONLY), f"{trickle.url}/slow.png", deadline_s=1.0)
        assert time.monotonic() - started < 2.5
    finally:
        trickle.close()


def test_the_size_cap_is_counted_while_streaming():
    trickle = TrickleHost(interval_s=0, total=5000)  # no Content-Length to refuse up front
    try:
        with pytest.raises(TooLarge):
            get(Outbound(LOOPBACK_ONLY), f"{trickle.url}/big.png", max_bytes=1000)
    finally:
        trickle.close()


def test_clients_are_told_one_sentence_for_every_refusal_and_failure(tmp_path, host):
    closed_port = ImageHost({})
    closed_port.close()
    closed_port.httpd.server_close()
    storage = Storage(tmp_path, secret=b"s", base_url="http://x", ttl_seconds=60)
    settings = Settings(data_dir=tmp_path, fetch_timeout_seconds=5, max_image_bytes=100)
    urls = [
        "http://169.254.169.254/latest/meta-data/",  # refused
        f"{host.url}/missing.png",  # 404 (allowed host)
        f"{closed_port.url}/a.png",  # connection refused
        "http://no-such-name.example/a.png",  # cannot resolve
    ]

    async def main():
        outbound = Outbound(LOOPBACK_ONLY, resolver=StubResolver({}))
        try:
            return await prefetch([*urls, f"{host.url}/a.png"], outbound=outbound, storage=storage, settings=settings)
        finally:
            await outbound.aclose()

    results = asyncio.run(main())
    for url in urls:
        assert isinstance(results[url], ImageFetchFailed) and results[url].message == FETCH_FAILED, url
    assert isinstance(results[f"{host.url}/a.png"], ImageTooLarge)  # a fetched image over the cap still says so
