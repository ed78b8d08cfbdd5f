"""Bearer-key authentication for routes that touch a caller's data (health, discovery documents and
signed file downloads are public)."""

from __future__ import annotations

from fastapi import Request

from incontext.service import keys
from incontext.service.errors import Unauthorized
from incontext.service.models import ApiKey

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="incontext"'}


def authenticate(request: Request) -> ApiKey:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    # A session of its own, closed at once: the route's session should not begin its
    # transaction before the route needs it (SQLite takes the write lock at BEGIN).
    with request.app.state.service.sessions() as session:
        key = keys.find_active(session, token)
    if key is None:
        raise Unauthorized("the API key is unknown or revoked", headers=_CHALLENGE)
    return key
