"""Connections the server makes on a client's behalf: GET an `image_url`, POST a callback.

Every request goes through `Outbound`, which
- resolves the host once, checks every address it got (netpolicy), and connects to a checked
  address, sending the original name as Host and as TLS SNI (certificates are verified
  against the name): a name that resolves elsewhere the second time is never asked twice;
- bounds the whole exchange, wait for a slot included, by one deadline: a server trickling
  its bytes cannot hold a request longer than that;
- runs on the event loop with at most `max_concurrent` exchanges at once, so waiting on a
  slow host never holds a thread of the pool that serves reads;
- ignores proxy environment variables: a proxy would resolve the name itself.

Failures raise `OutboundFailed` with the detail for the log; what a client is told about
them is the caller's choice (inputs.py tells one generic sentence).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

from incontext.service import netpolicy
from incontext.service.netpolicy import Address, NetPolicy

Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) → addresses
MAX_REDIRECTS = 3


class OutboundFailed(Exception):
    """A request the server made for a client was refused or failed; str() is for the log."""


class Refused(OutboundFailed):
    """The URL or every address it names is not one the policy allows: trying again cannot help."""


class TooLarge(OutboundFailed):
    def __init__(self, limit: int):
        super().__init__(f"more than {limit:,} bytes")
        self.limit = limit


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class Outbound:
    def __init__(self, policy: NetPolicy, *, max_concurrent: int = 16, resolver: Resolver = system_resolver):
        self.policy = policy
        self._resolver = resolver
        self._slots = asyncio.Semaphore(max_concurrent)
        self._client = None  # an httpx.AsyncClient, made at the first request

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _http(self):
        # httpx is imported (and its TLS context built) at the first request, not at start-up.
        import httpx

        if self._client is None:
            # No keep-alive: a pooled connection is keyed by address, and one verified for one
            # name must not carry a request for another name on the same address.
            self._client = httpx.AsyncClient(
                follow_redirects=False, trust_env=False, limits=httpx.Limits(max_keepalive_connections=0), timeout=None
            )
        return self._client

    async def get(self, url: str, *, deadline_s: float, max_bytes: int, headers: dict[str, str] | None = None) -> bytes:
        """The body of a 200 answer to GET `url`, following up to MAX_REDIRECTS redirects
        (each hop checked like the first). Raises OutboundFailed (TooLarge past `max_bytes`)."""
        try:
            async with asyncio.timeout(deadline_s), self._slots:
                for _ in range(MAX_REDIRECTS + 1):
                    status, location, body = await self._get_once(url, max_bytes, headers or {})
                    if location is None:
                        if status != 200:
                            raise OutboundFailed(f"GET {url} answered HTTP {status}")
                        return body
                    url = urljoin(url, location)
                raise OutboundFailed(f"more than {MAX_REDIRECTS} redirects")
        except TimeoutError:
            raise OutboundFailed(f"GET {url}: not done within {deadline_s:g} s") from None

    async def post(self, url: str, *, content: bytes, headers: dict[str, str], deadline_s: float) -> int:
        """POST and return the status code; redirects are not followed."""
        import httpx

        try:
            async with asyncio.timeout(deadline_s), self._slots:
                target, pinned_headers, extensions = await self._pin(url)
                try:
                    response = await self._http().post(target, content=content, headers={**headers, **pinned_headers}, extensions=extensions)
                except httpx.HTTPError as exc:
                    raise OutboundFailed(f"POST {url}: {exc.__class__.__name__}: {exc}") from None
                return response.status_code
        except TimeoutError:
            raise OutboundFailed(f"POST {url}: not done within {deadline_s:g} s") from None

    async def _get_once(self, url: str, max_bytes: int, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
        import httpx

        target, pinned_headers, extensions = await self._pin(url)
        try:
            async with self._http().stream("GET", target, headers={**headers, **pinned_headers}, extensions=extensions) as response:
                if response.is_redirect and "location" in response.headers:
                    return response.status_code, response.headers["location"], b""
                if response.status_code != 200:
                    return response.status_code, None, b""
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise TooLarge(max_bytes)
                body = bytearray()
                # Counted as it arrives: a missing or lying Content-Length changes nothing.
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise TooLarge(max_bytes)
                return 200, None, bytes(body)
        except httpx.HTTPError as exc:
            raise OutboundFailed(f"GET {url}: {exc.__class__.__name__}: {exc}") from None

    async def _pin(self, url: str) -> tuple[str, dict[str, str], dict]:
        """`url` with its host replaced by a checked address, and the Host header and TLS
        extensions that keep the original name."""
        if reason := netpolicy.url_refusal(url):
            raise Refused(f"{url[:200]!r}: {reason}")
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        address = await self._resolve(host, port)
        netloc = f"[{address}]" if address.version == 6 else str(address)
        if parts.port:
            netloc += f":{parts.port}"
        target = parts._replace(netloc=netloc).geturl()
        # The Host header as the client spelled it (minus credentials); SNI only for names.
        host_header = parts.netloc.rpartition("@")[2]
        extensions = {"sni_hostname": host} if parts.scheme == "https" and netpolicy.literal_address(host) is None else {}
        return target, {"Host": host_header}, extensions

    async def _resolve(self, host: str, port: int) -> Address:
        if (literal := netpolicy.literal_address(host)) is not None:
            addresses = [literal]
        else:
            try:
                answers = await self._resolver(host, port)
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in answers]
            except (OSError, ValueError) as exc:
                raise OutboundFailed(f"cannot resolve {host}: {exc}") from None
            if not addresses:
                raise OutboundFailed(f"{host} has no address")
        if reason := self.policy.check_all(addresses):
            raise Refused(f"{host}: {reason}")
        return addresses[0]
