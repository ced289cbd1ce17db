"""Text generation (chapter 5): the book's `generate`, with a KV cache, top-p and a seed; and
`generate_batch`, many prompts answered together.

Semantics follow the book: condition on the last `context_size` tokens; at temperature 0 take
the argmax; otherwise keep the top-k logits, divide by the temperature, sample from the softmax;
stop when `eos_id` comes out. With the cache, each new token runs one position through the
model instead of the whole prefix, and greedy output is the same token for token.

`Batch` runs many sequences through one forward per step (continuous batching): each row has its own
length, position and settings in a `BatchKVCache`, rows leave as they finish and waiting ones take
their place between steps. Each row follows `generate`'s steps for its prompt alone; its logits are
those of a forward of a different shape, equal to rounding (the last bits of a float32 sum depend on
how the matrix product is split), so a greedy row can differ from `generate`'s where two tokens' logits
tie to within that rounding (how often: docs/performance.md, Many prompts at once). A row alone in the
batch runs `generate`'s very forwards and gets its logits bit for bit.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llm.bounds import BATCH_SIZE, temperature_problem, top_p_problem
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
    _check_settings(model, max_new_tokens, context_size, temperature, top_k, top_p)
    check_token_ids(idx, model.cfg["vocab_size"], "the prompt")


def _check_settings(model, max_new_tokens, context_size, temperature, top_k, top_p):
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


def _next_token(logits, temperature, top_k, top_p, gen) -> torch.Tensor:
    """The book's choice of the next token from float32 logits (B, vocab): (B, 1)."""
    logits = _filter_logits(logits, top_k, top_p)
    if temperature > 0.0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=gen)
    return torch.argmax(logits, dim=-1, keepdim=True)


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
            nxt = _next_token(logits[:, -1, :].float(), temperature, top_k, top_p, gen)
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
    return _pieces(tokenizer, (int(token[0, 0]) for token in steps))


def decode_ids(tokenizer, ids: Iterable[int]) -> str:
    """The text of token ids (a row of `generate_batch`), exactly as `decode_stream`'s pieces join."""
    return "".join(_pieces(tokenizer, ids))


def _pieces(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in ids:
        yield decoder.decode(token_bytes(token, tokenizer))
    yield decoder.decode(b"", final=True)


# --- many sequences at once -----------------------------------------------------------------------------
@dataclass(eq=False)
class Row:
    """One sequence of a `Batch`: its prompt, its settings (those of `generate`), and what it generated.

    Build it with `new_row`, which checks the settings. `new` grows by a token per step; `finished` is set
    once the row produced `eos_id` (which is not appended, as `generate_stream` does not yield it), reached
    `max_new_tokens`, or was cancelled.
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    seed: int | None = None
    new: list[int] = field(default_factory=list)
    finished: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        """The argmax alone decides (no filter to apply first): such rows are chosen together."""
        return self.temperature == 0.0 and self.top_k is None and self.top_p is None


def new_row(
    model: GPTModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> Row:
    """A `Row` for `Batch.add`, its settings checked as `generate_stream` checks them (an LLMError)."""
    if len(prompt) == 0:
        raise LLMError("prompt must hold at least one token id, got none")
    _check_settings(model, max_new_tokens, context_size, temperature, top_k, top_p)
    check_token_ids(prompt, model.cfg["vocab_size"], "the prompt")
    row = Row(list(prompt), max_new_tokens, temperature, top_k, top_p, eos_id, seed)
    if seed is not None:
        row.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return row


class Batch:
    """Continuous batching: every `step()` gives each row in the batch its next token in one forward.

    Rows `add`ed wait until one of the `max_rows` places is free, and join between steps: their prompts
    (each cut to its last `context_size` tokens, as `generate` does) are prefilled together, right-padded,
    and give their first token in the same step. A row leaves when it finishes (`eos_id`,
    `max_new_tokens`) or is `cancel`led. A row whose window is full (`context_size` positions) is
    prefilled again from its last `context_size` tokens, as `generate` recomputes its window. Each row
    chooses its token as `generate` does, with its own settings and its own seeded generator.
    """

    PAD_WASTE = 2  # a prefill forward holds prompts at least 1/PAD_WASTE as long as its longest
    PREFILL_TOKENS = 8192  # and at most this many (padded) positions: more are prefilled in several forwards

    def __init__(self, model: GPTModel, context_size: int, max_rows: int):
        if not 1 <= context_size <= model.cfg["context_length"]:
            raise LLMError(f"context_size must be in [1, {model.cfg['context_length']}], got {context_size}")
        if max_rows < 1:
            raise LLMError(f"a batch needs at least one row, got {max_rows}")
        self.model, self.context_size, self.max_rows = model, context_size, max_rows
        self.device = next(model.parameters()).device
        self.cache = model.new_batch_kv_cache(context_size)
        self.rows: list[Row] = []  # in the batch, in the cache's row order
        self.waiting: deque[Row] = deque()

    def add(self, row: Row) -> None:
        self.waiting.append(row)

    def cancel(self, row: Row) -> None:
        """Stop `row`: it leaves the batch (or the waiting line) before the next step."""
        row.finished = True
        if row in self.waiting:
            self.waiting.remove(row)

    def __len__(self) -> int:
        """Rows in the batch or waiting for a place."""
        return sum(not r.finished for r in self.rows) + len(self.waiting)

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int | None]]:
        """One token for every row in the batch: (row, token) for each, and (row, None) for each row that
        finished this step (after its last token, or instead of one where it produced `eos_id`)."""
        events: list[tuple[Row, int | None]] = []
        # a row whose window is full is prefilled again from its last context_size tokens, as generate does
        full = [i for i, r in enumerate(self.rows) if not r.finished and self.cache.lengths[i] == self.context_size]
        joining = [self.rows[i] for i in full]
        self._leave({i for i, r in enumerate(self.rows) if r.finished} | set(full))
        while self.waiting and len(self.rows) + len(joining) < self.max_rows:
            row = self.waiting.popleft()
            if row.max_new_tokens == 0:
                row.finished = True
                events.append((row, None))
            else:
                joining.append(row)
        if not self.rows and not joining:
            return events
        training = self.model.training  # switched only when on: walking the modules costs ~1 ms a step
        if training:
            self.model.eval()
        try:
            logits = []
            if self.rows:  # one new position for every row already in the cache
                last = torch.tensor([[r.new[-1]] for r in self.rows], device=self.device)
                logits.append(self.model(last, kv_cache=self.cache)[:, -1, :].float())
            for group in self._prefill_groups(joining):
                logits.append(self._prefill(group))
                self.rows += group
        finally:
            if training:
                self.model.train()
        for row, token in zip(self.rows, self._choose(torch.cat(logits)), strict=True):
            if token == row.eos_id:
                row.finished = True
                events.append((row, None))
                continue
            row.new.append(token)
            events.append((row, token))
            if len(row.new) == row.max_new_tokens:
                row.finished = True
                events.append((row, None))
        return events

    def _leave(self, gone: set[int]) -> None:
        if gone:
            order = self.cache.drop(gone)
            self.rows = [self.rows[i] for i in order]

    def _window(self, row: Row) -> list[int]:
        return (row.prompt + row.new)[-self.context_size :]

    def _prefill_groups(self, rows: list[Row]) -> list[list[Row]]:
        """Rows to prefill, longest first, in groups of similar lengths (little padding)."""
        groups: list[list[Row]] = []
        for row in sorted(rows, key=lambda r: -len(self._window(r))):
            n = len(self._window(row))
            if groups:
                longest = len(self._window(groups[-1][0]))
                if n * self.PAD_WASTE >= longest and (len(groups[-1]) + 1) * longest <= self.PREFILL_TOKENS:
                    groups[-1].append(row)
                    continue
            groups.append([row])
        return groups

    def _prefill(self, rows: list[Row]) -> torch.Tensor:
        windows = [self._window(r) for r in rows]
        lengths = [len(w) for w in windows]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, : len(w)] = torch.tensor(w)
        view = self.cache.add(lengths)
        if len(rows) == 1:  # the logits of every position, of which generate takes the last: its very sums
            return self.model(ids.to(self.device), kv_cache=view)[:, -1, :].float()
        last = torch.tensor(lengths, device=self.device) - 1
        return self.model(ids.to(self.device), kv_cache=view, last=last)[:, -1, :].float()

    def _choose(self, logits: torch.Tensor) -> list[int]:
        """Each row's next token from its float32 logits: the greedy rows' argmax together, every other
        row as `generate` chooses, with its settings and generator."""
        chosen = [0] * len(self.rows)
        greedy = [i for i, r in enumerate(self.rows) if r.greedy]
        if greedy:
            rows = logits if len(greedy) == len(self.rows) else logits[torch.tensor(greedy, device=logits.device)]
            for i, token in zip(greedy, torch.argmax(rows, dim=-1).tolist(), strict=True):
                chosen[i] = token
        for i, row in enumerate(self.rows):
            if not row.greedy:
                token = _next_token(logits[i : i + 1], row.temperature, row.top_k, row.top_p, row.generator)
                chosen[i] = int(token)
        return chosen


def generate_batch(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    context_size: int,
    eos_id: int | None = None,
    batch_size: int = BATCH_SIZE,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    progress: str | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (lists of ids), in order: what `generate` adds to that prompt alone,
    without the prompt and without `eos_id`, `batch_size` prompts decoded at once (continuous batching:
    a finished row's place goes to the next prompt at once).

    The settings are `generate`'s, the same for every prompt; `seed` seeds each prompt's own generator,
    so a sampled row is what `generate(..., seed=seed)` gives that prompt alone (without a seed, rows
    draw from torch's global generator in turn). Greedy rows are equal to `generate`'s to rounding (the
    module's docstring). `progress` (a description, e.g. "responses") shows a bar of the prompts answered,
    off a terminal a line at every tenth (`llm.progress`).

        new = generate_batch(model, [encode(p)[-context:] for p in prompts], 64, context, eos_id=EOT_ID)
        texts = [decode_ids(get_tokenizer(), ids) for ids in new]
    """
    if batch_size < 1:
        raise LLMError(f"batch_size must be >= 1, got {batch_size}")
    rows = [new_row(model, p, max_new_tokens, context_size, temperature, top_k, eos_id, top_p, seed) for p in prompts]
    batch = Batch(model, context_size, batch_size)
    for row in rows:
        batch.add(row)
    # one tick per finished row, after a first one: a bar and `plain_lines` show an item once the next is asked for
    ticks = iter(progress_bar(range(len(rows)), desc=progress, unit="prompt", lines=True, disable=progress is None))
    next(ticks, None)
    training = model.training
    model.eval()
    try:
        while len(batch):
            for _, token in batch.step():
                if token is None:
                    next(ticks, None)
    finally:
        model.train(training)
    return [row.new for row in rows]
