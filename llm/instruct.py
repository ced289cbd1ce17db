"""Instruction finetuning (chapter 7): the book's data handling, prompt format, collate function,
response extraction, and offline evaluation (loss on response tokens, ROUGE-L, exact match).

`format_input`, `InstructionDataset` and `custom_collate_fn` keep the book's names and outputs
character for character and token for token; a second prompt style (Phi-3) and masking of the
prompt tokens in the loss (the book's exercise 7.2) are options. `respond` streams a finetuned
model's answer to one entry as text (what `llm instruct` prints), `respond_batch` the answers to a list
(`llm instruct --file`), in batches.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from llm.bounds import BATCH_SIZE
from llm.errors import LLMError
from llm.files import read_text
from llm.generate import decode_ids, decode_stream, generate_batch, generate_stream
from llm.prompts import (  # noqa: F401 - the book's chapter-7 names, importable from here
    extract_response,
    format_input,
    recorded_prompt_style,
    response_header,
)
from llm.tokenizer import EOT_ID, encode, get_tokenizer, token_ids_to_text

IGNORE_INDEX = -100


def load_instructions(path: str | os.PathLike, require_output: bool = True, what: str = "") -> list[dict[str, str]]:
    """A JSON list or JSONL file of {instruction, input?, output} entries, checked entry by entry.

    The file must be UTF-8 (a leading BOM is dropped); errors name it, after `what` (a flag or
    setting, e.g. "--file") when given, and where in it the problem is.
    """
    path = Path(path)
    text = read_text(path, what)
    name = f"{what} {path}" if what else str(path)
    try:
        if path.suffix == ".jsonl":
            data = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        data.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise LLMError(f"{name} is not valid JSON Lines: {exc.msg} at line {lineno}") from None
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LLMError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, list) or not data:
        raise LLMError(f"{name} must hold a non-empty list of entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise LLMError(f"{name}: entry {i} is not an object")
        for key in ("instruction", "output") if require_output else ("instruction",):
            if not isinstance(entry.get(key), str):
                raise LLMError(f"{name}: entry {i} needs a string {key!r}")
        if not isinstance(entry.get("input", ""), str):
            raise LLMError(f"{name}: entry {i}: 'input' must be a string")
    return data


def split_instructions(data: Sequence[dict], train_frac: float = 0.85, test_frac: float = 0.1):
    """The book's split: first 85% train, next 10% test, the rest validation (935 / 110 / 55)."""
    train_end = int(len(data) * train_frac)
    test_end = train_end + int(len(data) * test_frac)
    return list(data[:train_end]), list(data[train_end:test_end]), list(data[test_end:])


def respond(model, entry: dict, style: str = "alpaca", max_new_tokens: int = 256, tokenizer=None) -> Iterator[str]:
    """The model's greedy answer to one {instruction, input} entry, as text pieces while it is generated.

    The prompt ends with the response header, which the model was trained to write itself, so
    the answer streams alone; a prompt longer than the context keeps its last tokens; generation
    stops at <|endoftext|>. Join the pieces (and strip) for the whole answer.
    """
    tokenizer = tokenizer or get_tokenizer()
    context = model.cfg["context_length"]
    idx = torch.tensor([_prompt_ids(entry, style, context, tokenizer)], device=next(model.parameters()).device)
    yield from decode_stream(tokenizer, generate_stream(model, idx, max_new_tokens, context, eos_id=EOT_ID))


def respond_batch(
    model, entries: Sequence[dict], style: str = "alpaca", max_new_tokens: int = 256, batch_size: int = BATCH_SIZE
) -> list[str]:
    """Each entry's answer, as `respond`'s pieces join, `batch_size` entries generated at once
    (`llm.generate.generate_batch`)."""
    tokenizer = get_tokenizer()
    context = model.cfg["context_length"]
    prompts = [_prompt_ids(entry, style, context, tokenizer) for entry in entries]
    answers = generate_batch(model, prompts, max_new_tokens, context, eos_id=EOT_ID, batch_size=batch_size)
    return [decode_ids(tokenizer, ids) for ids in answers]


def answer_test_set(
    model,
    entries: Sequence[dict],
    style: str,
    max_new_tokens: int,
    eos_id: int | None = EOT_ID,
    batch_size: int = BATCH_SIZE,
    progress: str | None = None,
) -> list[str]:
    """The book's chapter-7 answers to a test set (the finetune_instruct stage's responses): each entry's
    `format_input` prompt (its last context_length tokens), greedy to `max_new_tokens` or `eos_id`, and
    the response extracted from the prompt followed by the new text. `batch_size` entries generate at
    once (`llm.generate.generate_batch`), each as `generate` answers it alone."""
    tokenizer = get_tokenizer()
    context = model.cfg["context_length"]
    prompts = [format_input(entry, style) for entry in entries]
    ids = [encode(prompt, tokenizer)[-context:] for prompt in prompts]
    answers = generate_batch(model, ids, max_new_tokens, context, eos_id, batch_size, progress=progress)
    # decode only the new tokens: a prompt longer than the context was cut on the left
    texts = [prompt + token_ids_to_text(torch.tensor([new], dtype=torch.long), tokenizer)
             for prompt, new in zip(prompts, answers, strict=True)]  # fmt: skip
    return [extract_response(text, prompt, style) for text, prompt in zip(texts, prompts, strict=True)]


def _prompt_ids(entry: dict, style: str, context: int, tokenizer) -> list[int]:
    return encode(format_input(entry, style) + response_header(style), tokenizer)[-context:]


class InstructionDataset(Dataset):
    """The book's dataset: each entry's prompt + response, tokenized once.

    Items are token-id lists as in the book; with `mask_prompt=True` they are (ids, prompt_length)
    so `custom_collate_fn` can drop the prompt tokens from the loss.
    """

    def __init__(self, data: Sequence[dict], tokenizer, style: str = "alpaca", mask_prompt: bool = False):
        self.data = data
        self.mask_prompt = mask_prompt
        prompts = [format_input(entry, style) + response_header(style) for entry in data]
        full = [format_input(entry, style) + response_header(style) + entry["output"] for entry in data]
        self.encoded_texts = tokenizer.encode_batch(full, disallowed_special=())
        self.prompt_lengths = [len(ids) for ids in tokenizer.encode_batch(prompts, disallowed_special=())]

    def __getitem__(self, index):
        if self.mask_prompt:
            return self.encoded_texts[index], self.prompt_lengths[index]
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=EOT_ID, ignore_index=IGNORE_INDEX, allowed_max_length=None, device="cpu"):
    """The book's collate: append <|endoftext|>, pad to the batch's longest, shift targets by one,
    keep the first padding token as a target and replace the others with `ignore_index`, then
    truncate to `allowed_max_length`. Items given as (ids, prompt_length) also mask the prompt."""
    items = [(item, 0) if isinstance(item, list) else item for item in batch]
    batch_max_length = max(len(ids) + 1 for ids, _ in items)
    inputs = torch.full((len(items), batch_max_length - 1), pad_token_id, dtype=torch.long)
    targets = torch.full((len(items), batch_max_length - 1), ignore_index, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(items):
        n = len(ids)
        seq = torch.tensor([*ids, pad_token_id], dtype=torch.long)
        inputs[row, :n] = seq[:n]
        targets[row, :n] = seq[1:]  # the last real target is the first pad (<|endoftext|>)
        if prompt_length > 1:
            targets[row, : prompt_length - 1] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.to(device), targets.to(device)


def make_collate(allowed_max_length: int | None):
    return partial(custom_collate_fn, allowed_max_length=allowed_max_length)


# --- evaluation ------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> bool:
    """Equal after lower-casing and dropping punctuation and extra whitespace."""
    return _words(candidate) == _words(reference)


def response_metrics(entries: Sequence[dict[str, Any]]) -> dict[str, float]:
    n = len(entries)
    return {
        "rouge_l": sum(rouge_l(e["model_response"], e["output"]) for e in entries) / n,
        "exact_match": sum(exact_match(e["model_response"], e["output"]) for e in entries) / n,
        "avg_response_words": sum(len(e["model_response"].split()) for e in entries) / n,
        "avg_reference_words": sum(len(e["output"].split()) for e in entries) / n,
    }
