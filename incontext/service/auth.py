"""Bearer-key authentication for routes that touch a caller's data (health, discovery documents and
signed file downloads are public)."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from incontext.service import keys
from incontext.service.errors import Unauthorized
from incontext.service.models import ApiKey

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="incontext"'}


async def authenticate(request: Request) -> ApiKey:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    key = await lookup(request, token)
    if key is None:
        raise Unauthorized("the API key is unknown or revoked", headers=_CHALLENGE)
    return key


async def lookup(request: Request, token: str) -> ApiKey | None:
    """The active key for `token`: from the cache on the event loop, else from the database in
    the thread pool (its own session, closed at once: the route's session should not begin
    its transaction before the route needs it, as SQLite takes the write lock at BEGIN)."""
    cache: keys.KeyCache = request.app.state.service.keys
    return cache.cached(token) or await run_in_threadpool(cache.find, token)
