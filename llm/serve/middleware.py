"""The API key and the body limit, checked before any route: pure ASGI middleware (`Gate`).

401 without `Authorization: Bearer KEY` when the server has a key (the page at GET / is open: it asks
for the key itself); 413 for a body over `max_body_bytes`, whether its Content-Length says so or it
grows past the limit while the route reads it.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from llm.serve.errors import error_response


class Gate:
    """`app.add_middleware(Gate, api_key=..., max_body_bytes=...)`."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        page = scope["path"] == "/" and scope["method"] in ("GET", "HEAD")
        if self.api_key and not page:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "no API key given" if not given else "wrong API key"
                message = f"{what}: send the header 'Authorization: Bearer KEY' with the server's key"
                response = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # answered 413 by llm.serve.errors
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"request body is over this server's limit of {self.max_body} bytes"

    def _too_large(self) -> JSONResponse:
        return error_response(413, self._message(), code="request_too_large")
