"""Conditional GETs for the routes clients poll (`GET /v1/runs/{id}`, the BFL `get_result`):
every answer carries a strong `ETag`; a request whose `If-None-Match` holds it gets 304 with
no body, so a client polling an unchanged run costs a database read and no transfer.

    body = RunPublic.from_row(run, storage).model_dump_json().encode()
    return conditional.answer(body, if_none_match, headers=limits)

The tag is a hash of the exact bytes the body would have, not of a few row fields: the body
holds output URLs signed at the time of the read (their `expires` moves every second), so a
tag from the row alone would call an old copy current while its URLs run out. Hashing the
body makes a 304 mean "your copy is byte for byte what you would get now": a client's URLs
are then as fresh as new ones. The price: a succeeded run with stored files answers 200 again
once a second has passed, which only a client that keeps polling an ended run pays.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Header
from fastapi.responses import Response

IfNoneMatch = Annotated[str | None, Header(alias="If-None-Match", description="an ETag from an earlier answer: 304 if it is still current")]

# Caches in between must ask again before reusing an answer: a run changes while it is polled.
CACHE_CONTROL = "no-cache"

NOT_MODIFIED = {304: {"description": "Not Modified: `If-None-Match` holds the current ETag; no body"}}


def etag(body: bytes) -> str:
    # A strong tag (no W/): equal tags mean equal bytes.
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """RFC 9110 §13.1.2: any listed tag equal to ours, compared weakly (a W/ prefix is ignored); `*` matches."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == tag for candidate in if_none_match.split(","))


def answer(body: bytes, if_none_match: str | None, headers: dict[str, str] | None = None) -> Response:
    """200 with the JSON body, or 304 without it when the client already holds these bytes."""
    tag = etag(body)
    headers = {**(headers or {}), "ETag": tag, "Cache-Control": CACHE_CONTROL}
    if matches(if_none_match, tag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)
