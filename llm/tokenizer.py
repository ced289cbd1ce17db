"""The GPT-2 BPE tokenizer (tiktoken `gpt2`) and the book's text <-> token-id helpers.

A model may have more outputs than the tokenizer has tokens (a `vocab_size` padded to 50304, as
nanoGPT does): decoding writes an id the tokenizer lacks as U+FFFD, the replacement character that
stands for undecodable bytes too, rather than failing in the middle of the text.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import tiktoken
import torch

from llm.errors import LLMError, TokenizerError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
REPLACEMENT = "\ufffd"  # what an id outside the tokenizer's vocabulary decodes to


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding; offline it reads the files cached in TIKTOKEN_CACHE_DIR."""
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as exc:  # tiktoken raises requests/urllib/OS errors when it cannot fetch
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        hint = f"TIKTOKEN_CACHE_DIR={where} does not hold them" if where else "TIKTOKEN_CACHE_DIR is not set"
        raise TokenizerError(
            f"cannot load tiktoken's gpt2 files ({type(exc).__name__}): {hint}; point "
            "TIKTOKEN_CACHE_DIR at a directory with tiktoken's cached gpt2 files, or go online"
        ) from None
    if enc.n_vocab != VOCAB_SIZE or enc.eot_token != EOT_ID:
        raise TokenizerError(f"unexpected gpt2 encoding: n_vocab {enc.n_vocab}, eot {enc.eot_token}")
    return enc


def encode(text: str, tokenizer: tiktoken.Encoding | None = None) -> list[int]:
    """Token ids of `text`, with `<|endoftext|>` allowed as the special token (as in pretraining)."""
    tokenizer = tokenizer or get_tokenizer()
    return tokenizer.encode(text, allowed_special={EOT_TOKEN})


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding | None = None) -> torch.Tensor:
    """The book's helper: a (1, T) tensor of token ids."""
    return torch.tensor(encode(text, tokenizer)).unsqueeze(0)


def token_bytes(token_id: int, tokenizer: tiktoken.Encoding | None = None) -> bytes:
    """The bytes of one token id; an id the tokenizer lacks gives REPLACEMENT's bytes."""
    tokenizer = tokenizer or get_tokenizer()
    if 0 <= token_id < tokenizer.n_vocab:
        return tokenizer.decode_single_token_bytes(token_id)
    return REPLACEMENT.encode()


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: tiktoken.Encoding | None = None) -> str:
    """The book's helper: decode a (1, T) or (T,) tensor of ids (an id the tokenizer lacks as
    REPLACEMENT)."""
    tokenizer = tokenizer or get_tokenizer()
    ids = token_ids.squeeze(0).tolist()
    if all(0 <= i < tokenizer.n_vocab for i in ids):
        return tokenizer.decode(ids)
    return b"".join(token_bytes(i, tokenizer) for i in ids).decode("utf-8", errors="replace")


def check_token_ids(ids: torch.Tensor | np.ndarray | Sequence[int], vocab_size: int, source: str) -> None:
    """Raise LLMError unless every id of `ids` is in [0, vocab_size); `source` names where they come from.

    `GPTModel.forward` does not look at the ids' values (see there): the project calls this once
    where ids enter a model, on the token files (`llm.data.read_tokens`), on prompts
    (`llm.generate`), on the finetuning datasets and on the messages `classify` scores.
    """
    if isinstance(ids, torch.Tensor):
        if ids.numel() == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(ids))
    else:
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        lo = 0 if arr.dtype.kind == "u" else int(arr.min())  # a token file is uint16: no pass for the minimum
        hi = int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise LLMError(f"{source}: token id {bad} is outside the vocabulary [0, {vocab_size}) of the model")
