"""A cap on request bodies, checked as they stream in: a 200 MB JSON body is refused at its
Content-Length, or after the first bytes past the cap, never read whole into memory."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from incontext.service.errors import error_body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than the {self.max_bytes:,}-byte limit"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse(error_body("PAYLOAD_TOO_LARGE", message), status_code=413, headers={"Connection": "close"})(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes FastAPI's body parsing unchanged and reaches the
                    # error handlers (errors.py) as a 413 with the usual body.
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, counting_receive, send)
