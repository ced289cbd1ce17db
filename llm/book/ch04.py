"""Chapter 4, implementing a GPT model: its config, its parts, and greedy generation.

The model and its parts are the engine's (`llm.model`), with the book's names, arguments and
state_dict keys. `generate_text_simple` is the book's greedy loop.
"""

from __future__ import annotations

import torch

from llm.generate import generate
from llm.model import GELU, GPT_CONFIG_124M, FeedForward, GPTModel, LayerNorm, TransformerBlock

__all__ = [
    "GPT_CONFIG_124M",
    "LayerNorm",
    "GELU",
    "FeedForward",
    "TransformerBlock",
    "GPTModel",
    "generate_text_simple",
]


def generate_text_simple(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The book's greedy loop: append the argmax of the last position's logits `max_new_tokens`
    times, conditioning on the last `context_size` tokens; returns (B, T + max_new_tokens).

    Runs `llm.generate.generate` without the KV cache at temperature 0, which gives the same tokens.
    The model runs in eval mode (the book's callers call `model.eval()` first) and is put back in
    the mode it was in.
    """
    return generate(model, idx, max_new_tokens, context_size, temperature=0.0, use_cache=False)
