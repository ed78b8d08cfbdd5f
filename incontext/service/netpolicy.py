"""Which hosts the server may connect to on a client's behalf: an `image_url` it fetches and a
`callback_url` it posts to. Loopback, private and link-local addresses are refused unless the
settings allow them (by default only when the server itself listens on loopback); otherwise a
client could make the server probe, or post into, the network it runs in."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def refusal(url: str, *, allow_private: bool) -> str | None:
    """Why the server must not connect to `url`, or None if it may. Resolves the host (blocking):
    call it at each connection, so a name that later resolves elsewhere is checked again."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"not an http(s) URL: {url[:100]}"
    if allow_private:
        return None
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError:
        return f"cannot resolve host {parts.hostname}"
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_global:
            return f"host {parts.hostname} resolves to a non-public address"
    return None
