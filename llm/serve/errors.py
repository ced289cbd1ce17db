"""The API's errors: JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

400 for a request that cannot be served (bad field, empty prompt, prompt + max_tokens beyond the
context, a model of the wrong kind or not loaded, an LLMError from the library), 401 without the API
key and 413 for a body over the limit (both from `llm.serve.middleware`), 404 and 405 for a path or
method the API does not have, 503 with `Retry-After` when the queue is full, 500 for a bug.
`HANDLERS` maps each exception to its response; `create_app` gives it to FastAPI.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm.errors import LLMError
from llm.serve.scheduler import QueueFull

RETRY_AFTER_S = 1  # what a 503 asks the client to wait


class APIError(Exception):
    """A request answered with `status` and OpenAI's error body; raise it anywhere in a route."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, **kw):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = kw.get("type", "invalid_request_error")
        self.headers = kw.get("headers")

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, **kw) -> JSONResponse:
    return APIError(status, message, **kw).response()


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request body as one line naming the field, and the field."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    if not loc:
        return f"the request body must be a JSON object: {first['msg']}", None
    # a union (str | list[str]) reports each member under a tag such as "str" or "list[str]": name the field
    path = [p for p in loc if not ("[" in p or p in {"str", "int", "float", "bool", "list", "dict"})]
    param = ".".join(path) or loc[0]
    same = [e["msg"] for e in errors if str(e["loc"][1] if len(e["loc"]) > 1 else "") == loc[0]]
    msgs = list(dict.fromkeys(same if len(same) > 1 else [first["msg"]]))
    return f"{param}: {' or '.join(msgs)}", param


# --- the handlers, one per exception ---------------------------------------------------------------------
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _llm_error(request: Request, exc: LLMError) -> JSONResponse:
    return error_response(400, " ".join(str(exc).split("\n")))


async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    limits = request.app.state.limits
    message = (
        f"the server is busy: {limits.max_active} requests are running and {limits.max_queue} are waiting; "
        f"retry in {RETRY_AFTER_S} s"
    )
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return error_response(503, message, type="server_error", code="queue_full", headers=headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    return error_response(400, message, param=param)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 413:  # a body that grew past the limit while it was read (the middleware)
        return error_response(413, str(exc.detail), code="request_too_large")
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path} (GET /v1/models lists the models)"
        return error_response(404, message, code="not_found")
    if exc.status_code == 405:
        message = f"{request.url.path} does not take {request.method}"
        return error_response(405, message, code="method_not_allowed", headers=exc.headers)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


HANDLERS = {
    APIError: _api_error,
    LLMError: _llm_error,
    QueueFull: _queue_full,
    RequestValidationError: _invalid,
    StarletteHTTPException: _http,
    Exception: _bug,
}
