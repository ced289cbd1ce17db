"""A request's generation and its answer: streamed as server-sent events, or collected into one body.

`Generation` is a row of its model's batch (`llm.serve.scheduler.Batcher`): the steps of `llm generate`
for its prompt, a token per step of the batch on the scheduler's worker, decoded to text and cut at a
stop sequence (`StopText`). `respond` is the one answer both text endpoints give:
with `"stream": true` an `EventStream` of chunks, the finish reason, the usage when asked, `[DONE]`;
without, the whole text once the generation ends. Either way a client that goes away stops the
generation at its next token and gives back its turn.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from llm.generate import new_row
from llm.serve.registry import ServedModel
from llm.serve.scheduler import Scheduler, Ticket
from llm.serve.schemas import ChatRequest, CompletionRequest
from llm.tokenizer import EOT_ID, get_tokenizer, token_bytes


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
    """One request's tokens: a row of its model's batch (`llm.generate.Batch`, the same steps as `llm generate`
    with a KV cache), decoded to text. `finish_reason` is "stop" (<|endoftext|>, unless the request sets
    `ignore_eos`, or a stop sequence) or "length" once `pieces()` is done."""

    def __init__(self, scheduler: Scheduler, served: ServedModel, ids: list[int], req, max_new: int, stops):
        self.scheduler, self.served = scheduler, served
        self.prompt_tokens, self.max_new = len(ids), max_new
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._row = new_row(  # checks the settings here, before any step (an LLMError: 400)
            served.model,
            ids,
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
        tokenizer = get_tokenizer()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        counts = self.scheduler.counts
        batcher = self.scheduler.batcher(self.served.model, self.served.context_length, self.served.id)
        tokens = batcher.join(self._row)
        try:
            while self.finish_reason is None:
                token = await tokens.get()
                if isinstance(token, BaseException):  # the step failed
                    raise token
                if token is None:  # the row finished: max_new tokens, or <|endoftext|>
                    self.finish_reason = "length" if self.completion_tokens == self.max_new else "stop"
                    text, stopped = self._stop.feed(decoder.decode(b"", final=True))
                    text += "" if stopped else self._stop.flush()
                else:
                    self.completion_tokens += 1
                    counts["tokens"] += 1
                    text, stopped = self._stop.feed(decoder.decode(token_bytes(token, tokenizer)))
                    if stopped:
                        self.finish_reason = "stop"
                if text:
                    yield text
        finally:  # done, or the client went away: the row leaves the batch at its next step
            batcher.leave(self._row)

    def usage(self) -> dict[str, int]:
        n, m = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


# --- the answer: streamed or collected -------------------------------------------------------------------
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


Chunk = Callable[[str | None, str | None], dict]  # (a piece of text or None, finish_reason) -> one chunk


async def respond(
    request: Request,
    req: CompletionRequest | ChatRequest,
    gen: Generation,
    ticket: Ticket,
    chunk: Chunk,
    whole: Callable[[str, str | None], dict],
    opening: dict | None = None,
) -> EventStream | dict:
    """The answer to a completion or chat request `req` once `ticket` gets its turn: its endpoint says
    how a streamed chunk looks (`chunk`: None where a chunk carries no text), how the collected body looks
    (`whole(text, finish_reason)`, the usage added last), and what a stream opens with (chat: the role)."""
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            await ticket.turn()
            if opening is not None:
                yield sse(opening)
            async for piece in gen.pieces():
                yield sse(chunk(piece, None))
            yield sse(chunk(None, gen.finish_reason))
            if include_usage:
                yield sse({**chunk(None, None), "choices": [], "usage": gen.usage()})
            yield "data: [DONE]\n\n"
            ticket.complete()

        return EventStream(events(), ticket)
    try:
        await ticket.turn()
        text = await collect(gen, request)
        if gen.finish_reason is not None:  # not cut short by the client leaving
            ticket.complete()
    finally:
        ticket.release()
    return {**whole(text, gen.finish_reason), "usage": gen.usage()}
