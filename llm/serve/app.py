"""The ASGI app: OpenAI-compatible endpoints over the loaded models, the fair queue, the limits, the page.

Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a request
that cannot be served (bad field, empty prompt, prompt + max_tokens beyond the context, a model of the
wrong kind or not loaded), 401 without the API key, 413 for a body over the limit, 503 with
`Retry-After` when the queue is full.
"""

from __future__ import annotations

import codecs
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm.errors import LLMError
from llm.serve.registry import CLASSIFIER, INSTRUCT, LANGUAGE, ServedModel
from llm.serve.scheduler import QueueFull, Scheduler, Ticket
from llm.serve.schemas import ChatRequest, ClassifyRequest, CompletionRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Limits:
    max_active: int = 8  # requests taking turns on the worker
    max_queue: int = 32  # requests waiting for a turn; more are answered 503
    max_tokens: int = 1024  # the most tokens one request may ask for
    max_body_bytes: int = 1_000_000  # a larger request body is answered 413


class APIError(Exception):
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


# --- the text a generation streams: UTF-8 pieces, cut at a stop sequence ---------------------------------
class StopText:
    """Text pieces up to the first stop sequence. A piece's tail that could begin a stop sequence is held
    back until the next piece shows whether it does, so no part of a stop sequence is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that may be sent now, whether a stop sequence was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:n]):
                    hold = n
                    break
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """One request's tokens: `generate_stream` (KV cache, the same steps as `llm generate`) run a token at a
    time on the scheduler's worker, decoded to text. `finish_reason` is "stop" (<|endoftext|>, unless the
    request sets `ignore_eos`, or a stop sequence) or "length" once `pieces()` is done."""

    def __init__(self, scheduler: Scheduler, served: ServedModel, ids: list[int], req, max_new: int, stops):
        import torch

        from llm.generate import generate_stream
        from llm.tokenizer import EOT_ID

        self.scheduler, self.served = scheduler, served
        self.prompt_tokens, self.max_new = len(ids), max_new
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        device = next(served.model.parameters()).device
        self._steps = generate_stream(  # checks the settings here, before any step (an LLMError: 400)
            served.model,
            torch.tensor([ids], device=device),
            max_new_tokens=max_new,
            context_size=served.context_length,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            eos_id=None if req.ignore_eos else EOT_ID,
            seed=req.seed,
        )
        self._stop = StopText(stops)

    async def pieces(self) -> AsyncIterator[str]:
        from llm.tokenizer import get_tokenizer, token_bytes

        tokenizer = get_tokenizer()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        counts = self.scheduler.counts
        try:
            while self.finish_reason is None:
                token = await self.scheduler.run(next, self._steps, None)
                if token is None:  # the steps ended: max_new tokens, or <|endoftext|>
                    self.finish_reason = "length" if self.completion_tokens == self.max_new else "stop"
                    text, stopped = self._stop.feed(decoder.decode(b"", final=True))
                    text += "" if stopped else self._stop.flush()
                else:
                    self.completion_tokens += 1
                    counts["tokens"] += 1
                    text, stopped = self._stop.feed(decoder.decode(token_bytes(int(token[0, 0]), tokenizer)))
                    if stopped:
                        self.finish_reason = "stop"
                if text:
                    yield text
            counts["completed"] += 1
        finally:
            if self.finish_reason is None:  # the client went away: stop here and free the turn
                counts["cancelled"] += 1
            self.scheduler.later(self._steps.close)  # after a step that may still run on the worker

    def usage(self) -> dict[str, int]:
        n, m = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


class EventStream(StreamingResponse):
    """Server-sent events; whatever ends the response (done, the client gone, shutdown), the events'
    generator is closed and the request's ticket given back."""

    def __init__(self, events: AsyncIterator[str], ticket: Ticket):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events, self._ticket = events, ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
            self._ticket.release()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# --- the middleware: the API key and the body limit, before any route ------------------------------------
class Gate:
    """Pure ASGI middleware: 401 without `Authorization: Bearer KEY` (when the server has a key; the page
    at GET / is open, it asks for the key itself), 413 for a body over `max_body_bytes`."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    @property
    def state(self):
        """The app's state: `scheduler`, `models`, `limits`."""
        return self.app.state

    async def __call__(self, scope, receive, send) -> None:
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
                if seen > self.max_body:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"request body is over this server's limit of {self.max_body} bytes"

    def _too_large(self) -> JSONResponse:
        return error_response(413, self._message(), code="request_too_large")


# --- the app ---------------------------------------------------------------------------------------------
def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request body as one line naming the field."""
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


def create_app(models: Mapping[str, ServedModel], api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The app over `models` (by name, `llm.serve.registry.load_models`)."""
    limits = limits or Limits()
    scheduler = Scheduler(limits.max_active, limits.max_queue)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="llm serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler, app.state.models, app.state.limits = scheduler, models, limits

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(LLMError)
    async def _llm_error(request, exc: LLMError):
        return error_response(400, " ".join(str(exc).split("\n")))

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc):
        message = (
            f"the server is busy: {limits.max_active} requests are running and {limits.max_queue} are waiting; "
            f"retry in {RETRY_AFTER_S} s"
        )
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return error_response(503, message, type="server_error", code="queue_full", headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            return error_response(413, str(exc.detail), code="request_too_large")
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (GET /v1/models lists the models)"
            return error_response(404, message, code="not_found")
        if exc.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
            return error_response(405, message, code="method_not_allowed", headers=exc.headers)
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    def pick(name: str | None, endpoint: str, kinds: tuple[str, ...]) -> ServedModel:
        if name is None:
            fitting = [m for m in models.values() if m.kind in kinds]
            if len(fitting) == 1:
                return fitting[0]
            raise APIError(400, f"'model' is required: this server holds {', '.join(models)}", param="model")
        served = models.get(name)
        if served is None:
            message = f"model {name!r} is not loaded here; loaded: {', '.join(models)} (GET /v1/models)"
            raise APIError(400, message, param="model", code="model_not_found")
        if served.kind not in kinds:
            if served.kind == CLASSIFIER:
                why = "is a classifier: it cannot generate text; POST /v1/classify"
            elif endpoint == "/v1/classify":
                why = "is not a classifier (a checkpoint of the finetune_spam stage)"
            else:
                why = "is not instruction-finetuned (its checkpoint records no prompt style): use /v1/completions"
            raise APIError(400, f"model {name!r} {why}", param="model", code="wrong_model_kind")
        return served

    def budget(served: ServedModel, n_prompt: int, asked: int | None, default: int | None) -> int:
        """The tokens to generate: `asked`, or the default that fits; a 400 when it cannot fit."""
        context = served.context_length
        if n_prompt >= context:
            raise APIError(
                400,
                f"the prompt is {n_prompt} tokens; model {served.id!r} has a context of {context} tokens, "
                "which leaves no room for an answer",
                param="prompt" if served.kind == LANGUAGE else "messages",
                code="context_length_exceeded",
            )
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"max_tokens must be <= {limits.max_tokens} (this server's limit), got {asked}",
                           param="max_tokens")  # fmt: skip
        if asked is None:
            return min(default or limits.max_tokens, limits.max_tokens, context - n_prompt)
        if n_prompt + asked > context:
            raise APIError(
                400,
                f"the prompt ({n_prompt} tokens) + max_tokens ({asked}) is {n_prompt + asked} tokens; model "
                f"{served.id!r} has a context of {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def reserve() -> Ticket:
        return scheduler.reserve()  # QueueFull: 503

    async def collect(gen: Generation, request: Request) -> str:
        """The whole text of a request answered in one piece, stopped when its client goes away."""
        pieces = []
        events = gen.pieces()
        try:
            async for piece in events:
                pieces.append(piece)
                if await request.is_disconnected():
                    break
        finally:
            await events.aclose()
        return "".join(pieces)

    def stops_of(req) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop takes at most 4 sequences, got {len(stops)}", param="stop")
        return stops

    def include_usage(req) -> bool:
        return bool(req.stream_options and req.stream_options.include_usage)

    # --- routes --------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("llm.serve").joinpath("index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), **scheduler.stats()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.card() for m in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in models:
            raise APIError(404, f"model {name!r} is not loaded here; loaded: {', '.join(models)}",
                           param="model", code="model_not_found")  # fmt: skip
        return models[name].card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        from llm.tokenizer import encode

        served = pick(req.model, "/v1/completions", (LANGUAGE, INSTRUCT))
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, f"give one prompt per request, got {len(prompts)}", param="prompt")
        prompt = prompts[0]
        if not prompt.strip():
            raise APIError(400, "the prompt is empty: give some text to continue", param="prompt")
        ids = encode(prompt)
        max_new = budget(served, len(ids), req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        stops = stops_of(req)
        gen = Generation(scheduler, served, ids, req, max_new, stops)
        ticket = reserve()
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {"id": cid, "object": "text_completion", "created": created, "model": served.id, "choices": [choice]}

        if req.stream:

            async def events():
                await ticket.turn()
                async for piece in gen.pieces():
                    yield sse(chunk(piece, None))
                yield sse(chunk("", gen.finish_reason))
                if include_usage(req):
                    yield sse({**chunk("", None), "choices": [], "usage": gen.usage()})
                yield "data: [DONE]\n\n"

            return EventStream(events(), ticket)
        try:
            await ticket.turn()
            text = await collect(gen, request)
        finally:
            ticket.release()
        return {**chunk(text, gen.finish_reason), "usage": gen.usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        from llm.prompts import format_input, response_header
        from llm.tokenizer import encode

        served = pick(req.model, "/v1/chat/completions", (INSTRUCT,))
        entry = chat_entry(req)
        ids = encode(format_input(entry, served.prompt_style) + response_header(served.prompt_style))
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_new = budget(served, len(ids), asked, None)
        gen = Generation(scheduler, served, ids, req, max_new, stops_of(req))
        ticket = reserve()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": served.id}

        def chunk(delta: dict, finish: str | None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        if req.stream:

            async def events():
                await ticket.turn()
                yield sse(chunk({"role": "assistant", "content": ""}, None))
                async for piece in gen.pieces():
                    yield sse(chunk({"content": piece}, None))
                yield sse(chunk({}, gen.finish_reason))
                if include_usage(req):
                    yield sse({**chunk({}, None), "choices": [], "usage": gen.usage()})
                yield "data: [DONE]\n\n"

            return EventStream(events(), ticket)
        try:
            await ticket.turn()
            text = await collect(gen, request)
        finally:
            ticket.release()
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": gen.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": gen.usage()}

    @app.post("/v1/classify")
    async def classify_texts(req: ClassifyRequest):
        from llm.classifier import classify

        served = pick(req.model, "/v1/classify", (CLASSIFIER,))
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise APIError(400, "input is an empty list: give a message or a list of messages", param="input")
        for i, text in enumerate(texts):
            if not text.strip():
                where = "" if isinstance(req.input, str) else f" (input[{i}])"
                raise APIError(400, f"the message is empty{where}: give some text to classify", param="input")
        ticket = reserve()
        try:
            await ticket.turn()
            scores = await scheduler.run(classify, served.model, served.classifier, texts)
        finally:
            ticket.release()
        data = [
            {"index": i, "label": label, "probability": p if label == "spam" else 1 - p, "spam_probability": p}
            for i, (label, p) in enumerate(zip(scores.labels, scores.spam_probability, strict=True))
        ]
        return {"object": "list", "model": served.id, "data": data, "truncated": scores.truncated}

    return Gate(app, api_key, limits.max_body_bytes)


def chat_entry(req: ChatRequest) -> dict[str, str]:
    """The {instruction, input} entry of a conversation, as chapter 7's prompt styles read it.

    The last message, which must be the user's, is the instruction. Every message before it is the
    input, in order, one paragraph each: a system (or developer) message as its text, an earlier turn
    as `User: text` or `Assistant: text`. So `[system: "The cake was baked by Sam.", user: "Rewrite the
    sentence in the active voice."]` is the book's entry with that instruction and that input, and a
    single user message is an instruction without input.
    """
    *before, last = req.messages
    if last.role != "user":
        raise APIError(400, f"the last message must be the user's (the instruction), got {last.role!r}",
                       param="messages")  # fmt: skip
    instruction = last.text()
    if not instruction.strip():
        raise APIError(400, "the last user message is empty: give an instruction", param="messages")
    labels = {"user": "User: ", "assistant": "Assistant: "}
    paragraphs = [labels.get(m.role, "") + m.text() for m in before if m.text().strip()]
    return {"instruction": instruction, "input": "\n\n".join(paragraphs)}
