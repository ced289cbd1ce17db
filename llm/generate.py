"""Text generation (chapter 5): the book's `generate`, with a KV cache, top-p and a seed.

Semantics follow the book: condition on the last `context_size` tokens; at temperature 0 take
the argmax; otherwise keep the top-k logits, divide by the temperature, sample from the softmax;
stop when `eos_id` comes out. With the cache, each new token runs one position through the
model instead of the whole prefix, and greedy output is the same token for token.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

import torch

from llm.bounds import temperature_problem, top_p_problem
from llm.errors import LLMError
from llm.model import GPTModel
from llm.progress import progress_bar
from llm.tokenizer import check_token_ids, token_bytes


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None:
        top_k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1): the book's [:, -1] only fits B=1
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # keep the first over p
        drop_sorted[..., 0] = False  # and always the most likely (a top_p below float32's range compares as 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(model, idx, max_new_tokens, context_size, temperature, top_k, top_p):
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise LLMError(f"prompt must be a non-empty (batch, seq_len) tensor, got {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise LLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 1 <= context_size <= model.cfg["context_length"]:
        raise LLMError(
            f"context_size must be in [1, {model.cfg['context_length']}] (the model's "
            f"context_length), got {context_size}"
        )
    # The sampling bounds are llm.bounds', shared with params.yaml and the HTTP API.
    if problem := temperature_problem(temperature):
        raise LLMError(f"temperature {problem}")
    if top_k is not None and top_k < 1:
        raise LLMError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and (problem := top_p_problem(top_p)):
        raise LLMError(f"top_p {problem}")
    check_token_ids(idx, model.cfg["vocab_size"], "the prompt")


def generate_stream(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids, shape (B, 1), one step at a time.

    Rows that already produced `eos_id` yield `eos_id` again; the stream ends (without yielding
    it) at the step where every row has produced `eos_id`, as the book's loop does for B=1.
    The arguments are checked here, before the first step is asked for (an LLMError).
    """
    _check_args(model, idx, max_new_tokens, context_size, temperature, top_k, top_p)
    return _steps(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, top_p, seed, use_cache)


@torch.inference_mode()
def _steps(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, top_p, seed, use_cache):
    gen = None
    if seed is not None:
        gen = torch.Generator(device=idx.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(idx.shape[0], context_size) if use_cache else None
    seq = idx
    done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            if cache is None:
                logits = model(seq[:, -context_size:])
            elif cache.pos == 0 or cache.room() == 0:
                # First step, or the window slid past the context: every position moved, so
                # recompute the window exactly as the book does.
                cache.reset()
                logits = model(seq[:, -context_size:], kv_cache=cache)
            else:
                logits = model(seq[:, -1:], kv_cache=cache)
            logits = logits[:, -1, :].float()
            logits = _filter_logits(logits, top_k, top_p)
            if temperature > 0.0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=gen)
            else:
                nxt = torch.argmax(logits, dim=-1, keepdim=True)
            if eos_id is not None:
                done = done | (nxt == eos_id)
                if bool(done.all()):
                    return
                nxt = nxt.masked_fill(done, eos_id)
            seq = torch.cat([seq, nxt], dim=1)
            yield nxt
    finally:
        model.train(was_training)


def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """The book's `generate`: returns the prompt followed by the new tokens, shape (B, T+n).

    `seed` makes sampling reproducible without touching the global RNG; without it, sampling
    draws from torch's global generator as the book's code does (`torch.manual_seed(123)`).
    """
    steps = generate_stream(
        model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, top_p, seed, use_cache
    )
    new = [t for t in progress_bar(steps, total=max_new_tokens, desc="generate", unit="tok", disable=not progress)]
    return torch.cat([idx, *new], dim=1) if new else idx.clone()


def decode_stream(tokenizer, steps: Iterable[torch.Tensor]) -> Iterator[str]:
    """Text pieces of streamed (1, 1) token ids; BPE tokens can split a UTF-8 character, so the
    bytes are decoded incrementally. An id the tokenizer lacks (a model whose vocab_size is larger
    than GPT-2's 50257) comes out as U+FFFD (`llm.tokenizer.REPLACEMENT`)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in steps:
        yield decoder.decode(token_bytes(int(token[0, 0]), tokenizer))
    yield decoder.decode(b"", final=True)
