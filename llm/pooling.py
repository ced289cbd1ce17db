"""How a classifier reads one prediction out of a sequence of per-token logits (chapter 6).

`POOL` is the registry, one function for each name of `llm.choices.POOLINGS` (a test keeps them
equal): `finetune_spam.pooling` allows exactly those names, and a classifier checkpoint records the
name it was trained with. `last` is the book's `[:, -1, :]`; with right
padding that position is a pad for every shorter message, so `last_nonpad` reads the last real
token and `mean` averages over the real tokens (the head is linear: the same as classifying the
mean state).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _last(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :]


def _last_nonpad(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    lengths = real.sum(dim=1).clamp(min=1)
    return logits[torch.arange(len(logits), device=logits.device), lengths - 1]


def _mean(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    lengths = real.sum(dim=1).clamp(min=1)
    return (logits * real.unsqueeze(-1)).sum(dim=1) / lengths.unsqueeze(-1)


# (logits (B, T, C), real-token mask (B, T)) -> pooled logits (B, C)
POOL: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "last": _last,
    "last_nonpad": _last_nonpad,
    "mean": _mean,
}


def pool(logits: torch.Tensor, input_ids: torch.Tensor, pooling: str, pad_token_id: int) -> torch.Tensor:
    """`logits` (B, T, C) of `input_ids` (B, T) pooled to (B, C) the way `pooling` names."""
    return POOL[pooling](logits, input_ids != pad_token_id)
