"""Chapter 3, coding attention mechanisms: self-attention with trainable weights, then the
causal multi-head attention the GPT model uses.

`SelfAttention_v2` is the book's class (section 3.4): no mask, no dropout, one head.
`MultiHeadAttention` is the engine's (`llm.model`): the book's weights and state_dict keys, run on
`scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.model import MultiHeadAttention

__all__ = ["SelfAttention_v2", "MultiHeadAttention"]


class SelfAttention_v2(nn.Module):
    """The book's listing 3.2: queries, keys and values from three `nn.Linear` layers, then
    `softmax(Q K^T / sqrt(d_k)) V` over every pair of tokens (no causal mask).

    Takes (num_tokens, d_in) like the book's; a leading batch dimension also works.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(-2, -1)  # the book's `keys.T` for 2-D input
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values
