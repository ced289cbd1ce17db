"""The endpoints, on two routers: `page` (GET /, the page to try the models) and `api` (/health, /v1/...).

Each route reads its request, picks the model (`pick`), sizes the answer (`budget`), then hands a
`Generation` and a place in the queue to `llm.serve.streaming.respond`. The models, the scheduler and the
limits come from `llm.serve.state`; whatever cannot be served raises an `APIError` (`llm.serve.errors`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from llm.classifier import BATCH_SIZE, Scores, classify
from llm.prompts import format_input, response_header
from llm.serve.errors import APIError
from llm.serve.registry import CLASSIFIER, INSTRUCT, LANGUAGE, ServedModel
from llm.serve.scheduler import Scheduler
from llm.serve.schemas import ChatRequest, ClassifyRequest, CompletionRequest
from llm.serve.state import LimitsDep, ModelsDep, SchedulerDep
from llm.serve.streaming import Generation, respond
from llm.tokenizer import encode

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 4  # OpenAI's limit on `stop`

page = APIRouter()
api = APIRouter()


# --- what every request is checked for ---------------------------------------------------------------
def pick(models: Mapping[str, ServedModel], name: str | None, endpoint: str, kinds: tuple[str, ...]) -> ServedModel:
    """The model a request names (or the one model of `kinds` when it names none) if it can serve `endpoint`."""
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


def budget(served: ServedModel, n_prompt: int, asked: int | None, default: int | None, max_tokens: int) -> int:
    """The tokens to generate: `asked`, or the default that fits; a 400 when it cannot fit the model's
    context or is over the server's `max_tokens`."""
    context = served.context_length
    if n_prompt >= context:
        raise APIError(
            400,
            f"the prompt is {n_prompt} tokens; model {served.id!r} has a context of {context} tokens, "
            "which leaves no room for an answer",
            param="prompt" if served.kind == LANGUAGE else "messages",
            code="context_length_exceeded",
        )
    if asked is not None and asked > max_tokens:
        message = f"max_tokens must be <= {max_tokens} (this server's limit), got {asked}"
        raise APIError(400, message, param="max_tokens")
    if asked is None:
        return min(default or max_tokens, max_tokens, context - n_prompt)
    if n_prompt + asked > context:
        raise APIError(
            400,
            f"the prompt ({n_prompt} tokens) + max_tokens ({asked}) is {n_prompt + asked} tokens; model "
            f"{served.id!r} has a context of {context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return asked


def stops_of(req: CompletionRequest | ChatRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", param="stop")
    return stops


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


# --- the page and the read-only endpoints ----------------------------------------------------------------
@page.get("/", response_class=HTMLResponse)
async def index():
    return HTMLResponse(resources.files("llm.serve").joinpath("index.html").read_text(encoding="utf-8"))


@api.get("/health")
async def health(models: ModelsDep, scheduler: SchedulerDep, limits: LimitsDep):
    """200 with "status": "ok", or 503 with "stalled" while one model step has run longer than the stall
    timeout (the worker is stuck: every request waits behind it); the models, the queue, the counts and
    what the worker runs (`Scheduler.health`)."""
    worker = scheduler.health(limits.stall_timeout)
    body = {"status": worker.pop("status"), "models": list(models), **scheduler.stats(), **worker}
    return JSONResponse(body, status_code=503 if body["status"] == "stalled" else 200)


@api.get("/v1/models")
async def list_models(models: ModelsDep):
    return {"object": "list", "data": [m.card() for m in models.values()]}


@api.get("/v1/models/{name:path}")
async def get_model(name: str, models: ModelsDep):
    if name not in models:
        raise APIError(404, f"model {name!r} is not loaded here; loaded: {', '.join(models)}",
                       param="model", code="model_not_found")  # fmt: skip
    return models[name].card()


# --- generation and classification -----------------------------------------------------------------------
@api.post("/v1/completions")
async def completions(
    req: CompletionRequest, request: Request, models: ModelsDep, scheduler: SchedulerDep, limits: LimitsDep
):
    served = pick(models, req.model, "/v1/completions", (LANGUAGE, INSTRUCT))
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise APIError(400, f"give one prompt per request, got {len(prompts)}", param="prompt")
    prompt = prompts[0]
    if not prompt.strip():
        raise APIError(400, "the prompt is empty: give some text to continue", param="prompt")
    ids = encode(prompt)
    max_new = budget(served, len(ids), req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, limits.max_tokens)
    gen = Generation(scheduler, served, ids, req, max_new, stops_of(req))
    ticket = scheduler.reserve()  # QueueFull: 503
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str | None, finish: str | None) -> dict:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": cid, "object": "text_completion", "created": created, "model": served.id, "choices": [choice]}

    return await respond(request, req, gen, ticket, chunk, whole=chunk)


@api.post("/v1/chat/completions")
async def chat_completions(
    req: ChatRequest, request: Request, models: ModelsDep, scheduler: SchedulerDep, limits: LimitsDep
):
    served = pick(models, req.model, "/v1/chat/completions", (INSTRUCT,))
    entry = chat_entry(req)
    ids = encode(format_input(entry, served.prompt_style) + response_header(served.prompt_style))
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_new = budget(served, len(ids), asked, None, limits.max_tokens)
    gen = Generation(scheduler, served, ids, req, max_new, stops_of(req))
    ticket = scheduler.reserve()  # QueueFull: 503
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.id}

    def frame(delta: dict, finish: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    def chunk(text: str | None, finish: str | None) -> dict:
        return frame({} if text is None else {"content": text}, finish)

    def whole(text: str, finish: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**head, "object": "chat.completion", "choices": [choice]}

    opening = frame({"role": "assistant", "content": ""}, None)
    return await respond(request, req, gen, ticket, chunk, whole, opening)


async def classify_in_steps(
    scheduler: Scheduler, served: ServedModel, texts: list[str], request: Request
) -> Scores | None:
    """`classify(model, settings, texts)`, one batch of BATCH_SIZE messages per step on the worker, so
    that a long list takes turns with the other requests' steps as a generation does; None when the
    client went away (checked before each batch). Every message is padded to the classifier's max_length
    whatever its batch, and the batches are `classify`'s own, so the scores are its scores, bit for bit."""
    probabilities, truncated = [], 0
    for start in range(0, len(texts), BATCH_SIZE):
        if await request.is_disconnected():
            return None
        batch = texts[start : start + BATCH_SIZE]
        what = f"{served.id}: classify messages {start + 1}-{start + len(batch)} of {len(texts)}"
        scores = await scheduler.run(classify, served.model, served.classifier, batch, BATCH_SIZE, what=what)
        probabilities += scores.spam_probability
        truncated += scores.truncated
    return Scores(probabilities, truncated)


@api.post("/v1/classify")
async def classify_texts(
    req: ClassifyRequest, request: Request, models: ModelsDep, scheduler: SchedulerDep, limits: LimitsDep
):
    served = pick(models, req.model, "/v1/classify", (CLASSIFIER,))
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise APIError(400, "input is an empty list: give a message or a list of messages", param="input")
    if len(texts) > limits.max_classify_inputs:
        message = f"input takes at most {limits.max_classify_inputs} messages (this server's limit), got {len(texts)}"
        raise APIError(400, message, param="input")
    for i, text in enumerate(texts):
        if not text.strip():
            where = "" if isinstance(req.input, str) else f" (input[{i}])"
            raise APIError(400, f"the message is empty{where}: give some text to classify", param="input")
    ticket = scheduler.reserve()  # QueueFull: 503
    try:
        await ticket.turn()
        scores = await classify_in_steps(scheduler, served, texts, request)
        if scores is None:  # the client left: nobody reads this answer (499: nginx's "client closed request")
            return Response(status_code=499)
        ticket.complete()
    finally:
        ticket.release()
    data = [
        {"index": i, "label": label, "probability": p if label == "spam" else 1 - p, "spam_probability": p}
        for i, (label, p) in enumerate(zip(scores.labels, scores.spam_probability, strict=True))
    ]
    return {"object": "list", "model": served.id, "data": data, "truncated": scores.truncated}
