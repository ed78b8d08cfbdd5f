"""Which addresses the server may connect to on a client's behalf: an `image_url` it fetches
and a `callback_url` it posts to.

Only public unicast addresses, by default and whatever the server's own bind: behind a
reverse proxy the app listens on loopback, and its neighbours (the proxy's admin port, a
database, the cloud's metadata service at 169.254.169.254) are exactly what a client must not
reach through it. Private networks are allowed only by an explicit setting (local
development, the tests), or network by network (`INCONTEXT_FETCH_ALLOWED_NETWORKS`).

The policy judges addresses, never names: outbound.py resolves a name once, checks every
address it got, and connects to a checked one, so a name that answers differently the second
time (DNS rebinding) gains nothing.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: the last 32 bits are an IPv4 address


@dataclass(frozen=True)
class NetPolicy:
    allow_private: bool = False
    allowed_networks: tuple[Network, ...] = field(default=())  # allowed even when not public

    @classmethod
    def from_settings(cls, settings) -> NetPolicy:
        return cls(settings.fetch_private_networks, tuple(ipaddress.ip_network(n, strict=False) for n in settings.fetch_allowed_networks))

    def refusal(self, address: Address) -> str | None:
        """Why the server must not connect to `address`, or None if it may."""
        if self.allow_private or any(address in n for n in self.allowed_networks if n.version == address.version):
            return None
        return address_refusal(address)

    def check_all(self, addresses: Iterable[Address]) -> str | None:
        """A name is refused if any of its addresses is: the connection may pick any of them."""
        for address in addresses:
            if reason := self.refusal(address):
                return reason
        return None


def address_refusal(address: Address) -> str | None:
    """Why `address` is not a public unicast address, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address):
        # Forms that carry an IPv4 address inside an IPv6 one reach that IPv4 host.
        if address.ipv4_mapped is not None:
            return address_refusal(address.ipv4_mapped)
        if address.sixtofour is not None or address.teredo is not None:
            return f"{address} is a 6to4 or Teredo tunnel address"
        if address in _NAT64:
            return address_refusal(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.is_multicast:
        return f"{address} is a multicast address"
    if not address.is_global or address.is_reserved or address.is_unspecified:
        # is_global is False for loopback, private, link-local (169.254/16, fe80::/10),
        # CGNAT (100.64/10), benchmarking and documentation ranges.
        return f"{address} is not a public address"
    return None


def literal_address(host: str) -> Address | None:
    """The address a URL's host spells, in any form a resolver would accept: dotted quads,
    but also `2130706433`, `0x7f000001`, `0177.0.0.1` and `127.1` (inet_aton's forms, which
    getaddrinfo honours), and bracketed IPv6. None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def url_refusal(url: str) -> str | None:
    """Why `url` cannot be connected to at all (its form, before any name is resolved).
    outbound.py asks this before every connection and the schemas ask it at submission, so a
    URL accepted at submission is one the sender can parse."""
    import httpx  # the parser the sender's client uses; here, not at start-up

    try:
        parts = urlsplit(url)
        parts.port  # raises on a bad port
        raw_host = httpx.URL(url).raw_host
    except (ValueError, httpx.InvalidURL):
        return "not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http(s) URL"
    if not _HOST.fullmatch(raw_host):  # httpx percent-encodes what it cannot take (a space)
        return "not a valid host name"
    return None


_HOST = re.compile(rb"[A-Za-z0-9._:-]+")  # the host as sent: IDNA-encoded name, IPv4 or IPv6 literal
