"""The book's GPT (chapter 4), with the book's module and parameter names.

The structure and `state_dict` keys are the book's, so its checkpoints load here strictly and
ours load into its code. Underneath, attention runs on `scaled_dot_product_attention` (fused,
no T x T score matrix kept for backward), LayerNorm and GELU on their fused kernels, and the
model accepts a `KVCache` so generation costs one position's work per new token.

The config `GPTModel(cfg)` takes (the book's seven keys and `tie_embeddings`, `GPT_CONFIG_124M`, the
presets, `model_config`) lives in the torch-free `llm.config`, which the settings parser reads too;
importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import GPT_CONFIG_124M, PRESETS, model_config
from llm.errors import LLMError


class LayerNorm(nn.Module):
    """The book's LayerNorm: biased variance, eps 1e-5, parameters named `scale`/`shift`."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """The tanh approximation of GELU that GPT-2 and the book use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated once.

    `GPTModel.forward(idx, kv_cache=cache)` appends the new positions of every row and advances `pos`:
    the rows of a batch share one length (`BatchKVCache` gives each its own).
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = max_len or cfg["context_length"]
        head_dim = cfg["emb_dim"] // cfg["n_heads"]
        shape = (cfg["n_layers"], batch_size, cfg["n_heads"], self.max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """An empty cache that writes into `k` and `v` ([layers, batch, heads, max_len, head_dim], views of
        a `BatchKVCache`'s rows: how rows of different lengths are prefilled there)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.pos = k, v, k.shape[3], 0
        return cache

    def reset(self) -> None:
        self.pos = 0

    def room(self) -> int:
        return self.max_len - self.pos

    def longest(self) -> int:
        return self.pos

    def start(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        """The positions of a forward's `seq_len` new tokens (the same in every row)."""
        return torch.arange(self.pos, self.pos + seq_len, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Store the new positions' keys and values, then attend from the new queries to every cached position."""
        past, t = self.pos, q.shape[2]
        k, v = self.update(layer, k, v)
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if t == 1:  # one new token attends to every cached position: no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        # several new tokens after a cached prefix: causal mask shifted by `past`
        allowed = torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(past)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)

    def advance(self, seq_len: int) -> None:
        self.pos += seq_len


class BatchKVCache:
    """Keys and values of sequences of different lengths, for decoding them together (`llm.generate.Batch`).

    Row i of a forward is row i here and holds `lengths[i]` positions: a forward of ids (n, 1) runs one new
    token of each of the first n rows, at position `lengths[i]` of row i (its own position embedding, its
    own place in the cache), attending to that row's positions alone. New rows are prefilled with `add`,
    rows leave with `drop`. The storage grows as rows and positions need it (doubling, up to `max_len`
    positions), so a batch of short sequences does not hold the memory of full contexts.
    """

    def __init__(self, cfg: Mapping[str, Any], max_len: int, device=None, dtype: torch.dtype = torch.float32):
        self.cfg, self.max_len, self.device, self.dtype = cfg, max_len, device, dtype
        self.lengths: list[int] = []
        self.k = self.v = torch.empty(0, device=device, dtype=dtype)
        self._decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None

    def _reserve(self, rows: int, length: int) -> None:
        """Storage for at least `rows` rows of `length` positions (what is held is kept); each dimension
        that must grow at least doubles, positions up to `max_len`."""
        have_rows, have_len = (self.k.shape[1], self.k.shape[3]) if self.k.dim() == 5 else (0, 0)
        if rows <= have_rows and length <= have_len:
            return
        rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        length = min(max(length, 2 * have_len), self.max_len) if length > have_len else have_len
        cfg = self.cfg
        shape = (cfg["n_layers"], rows, cfg["n_heads"], length, cfg["emb_dim"] // cfg["n_heads"])
        # zeros, not empty: a row's masked positions still meet the attention's matmul, where garbage
        # could be NaN or inf (0 x NaN = NaN)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        n = len(self.lengths)
        if n:
            k[:, :n, :, :have_len] = self.k[:, :n]
            v[:, :n, :, :have_len] = self.v[:, :n]
        self.k, self.v = k, v

    def add(self, lengths: list[int]) -> KVCache:
        """Rows for sequences of these lengths, after the rows held: the `KVCache` to prefill them with (their
        ids right-padded to the longest, so every row starts at position 0 and the causal mask keeps each
        real position from the padding after it). What the padding writes is past a row's length: it is
        masked out, then overwritten as the row grows."""
        if max(lengths) > self.max_len:
            raise LLMError(f"KV cache rows hold at most {self.max_len} positions, got {max(lengths)}")
        first = len(self.lengths)
        self._reserve(first + len(lengths), max(lengths) + 1)
        self.lengths += lengths
        rows = slice(first, first + len(lengths))
        return KVCache.over(self.k[:, rows, :, : max(lengths)], self.v[:, rows, :, : max(lengths)])

    def drop(self, gone: set[int]) -> list[int]:
        """Free rows `gone`; the last rows move into their places, so rows in use stay first. Returns, for
        each row now held, the index it had before."""
        n = len(self.lengths)
        kept = [i for i in range(n) if i not in gone]
        order = list(range(len(kept)))
        holes = [i for i in order if i in gone]
        movers = [i for i in kept if i >= len(kept)]
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if holes:
            src, dst = torch.tensor(movers, device=self.device), torch.tensor(holes, device=self.device)
            span = max(self.lengths[i] for i in movers)
            self.k[:, dst, :, :span] = self.k[:, src, :, :span]
            self.v[:, dst, :, :span] = self.v[:, src, :, :span]
        self.lengths = [self.lengths[i] for i in order]
        if not order:  # the last row left: give the memory back (a server between bursts)
            self.k = self.v = torch.empty(0, device=self.device, dtype=self.dtype)
        return order

    def room(self) -> int:
        return self.max_len - max(self.lengths, default=0)

    def longest(self) -> int:
        return max(self.lengths, default=0)

    def start(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        """The position of the new token of each of the first `batch_size` rows, (n, 1); and what every
        layer's `attend` needs: where to write, and which positions each row may see."""
        n = batch_size
        if seq_len != 1:
            raise LLMError(f"a BatchKVCache decodes one token per row, got {seq_len}: prefill new rows with add()")
        if not 0 < n <= len(self.lengths):
            raise LLMError(f"a forward of {n} rows, the cache holds {len(self.lengths)}")
        lengths = self.lengths[:n]
        span = max(lengths) + 1
        if span > self.max_len:
            raise LLMError(f"KV cache has room for 0 tokens in a row of {span - 1}")
        self._reserve(n, span)
        pos = torch.tensor(lengths, device=device)
        allowed = None  # rows of one length see every position, as KVCache's one new token does: no mask
        if min(lengths) < span - 1:
            allowed = (torch.arange(span, device=device) <= pos[:, None])[:, None, None, :]  # (n, 1, 1, span)
        self._decode = (torch.arange(n, device=device), pos, allowed, span)
        return pos[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        rows, pos, allowed, span = self._decode
        n = q.shape[0]
        keys, values = self.k[layer], self.v[layer]
        keys[rows, :, pos] = k[:, :, 0]
        values[rows, :, pos] = v[:, :, 0]
        return F.scaled_dot_product_attention(
            q, keys[:n, :, :span], values[:n, :, :span], attn_mask=allowed, dropout_p=dropout_p
        )

    def advance(self, seq_len: int) -> None:
        n = len(self._decode[0])
        self.lengths[:n] = [length + seq_len for length in self.lengths[:n]]
        self._decode = None


ROWS_HEAD_MAX = 8  # see GPTModel._rows_logits

# The book's causal-mask buffer: MultiHeadAttention emits it in `state_dict()` under this name,
# so in a GPTModel's state dict its keys end in MASK_SUFFIX (`trf_blocks.<i>.att.mask`).
MASK_NAME = "mask"
MASK_SUFFIX = f".att.{MASK_NAME}"


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with the book's `W_query`/`W_key`/`W_value`/`out_proj`.

    The book keeps a `mask` buffer (an upper-triangular T x T matrix) in every layer's state
    dict. Here it is not held in memory; `state_dict()` still emits it and `load_state_dict`
    accepts (and checks) it, so checkpoints stay interchangeable with the book's code.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads:
            raise LLMError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)  # applied to attention weights, as in the book
        self.layer_idx = 0  # set by GPTModel: which slot of a KVCache this layer uses

    def book_mask(self) -> torch.Tensor:
        return torch.triu(torch.ones(self.context_length, self.context_length), diagonal=1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        device = next(self.parameters()).device  # W_query may be wrapped (LoRA): ask any parameter
        destination[prefix + MASK_NAME] = self.book_mask().to(device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        mask = state_dict.pop(prefix + MASK_NAME, None)  # load_state_dict passes its own copy
        expected = (self.context_length, self.context_length)
        if mask is not None and tuple(mask.shape) != expected:
            errors.append(
                f"size mismatch for {prefix}{MASK_NAME}: checkpoint has {tuple(mask.shape)}, "
                f"model has {expected} (context_length {self.context_length})"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | BatchKVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.W_query(x).view(shape).transpose(1, 2)
        k = self.W_key(x).view(shape).transpose(1, 2)
        v = self.W_value(x).view(shape).transpose(1, 2)
        dropout_p = self.dropout.p if self.training else 0.0
        if kv_cache is None:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # the cache stores the new keys and values and knows which positions each query sees
            ctx = kv_cache.attend(self.layer_idx, q, k, v, dropout_p)
        ctx = ctx.transpose(1, 2).reshape(b, t, self.d_out)
        return self.out_proj(ctx)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor, kv_cache: KVCache | BatchKVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """`GPTModel(cfg)` with the book's config keys; `forward(idx)` returns logits (B, T, vocab)."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        cfg = model_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        for i, block in enumerate(self.trf_blocks):
            block.att.layer_idx = i
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg["tie_embeddings"]:
            # Tied (GPT-2's layout, not the book's): one [vocab, emb] matrix embeds the tokens and computes the
            # logits. Every module above was built as untied, so an untied model draws torch's RNG exactly as
            # the book's does; tied, the draws are the same and tok_emb's N(0, 1) draw is then dropped. The
            # shared matrix keeps out_head's init (uniform, bound 1/sqrt(emb_dim)): with N(0, 1) rows the
            # logits of the first step would have a standard deviation near sqrt(emb_dim) (the final norm's
            # output has unit variance per feature), a loss far above ln(vocab). The price: token embeddings
            # start about sqrt(3 * emb_dim) times smaller than the N(0, 1) position embedding.
            self.tok_emb.weight = self.out_head.weight
        self._head_t: tuple[tuple, torch.Tensor] | None = None  # see _cached_logits; not in state_dict

    def forward(
        self,
        in_idx: torch.Tensor,
        kv_cache: KVCache | BatchKVCache | None = None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) of every position; with `last` (B,), only those of position `last[i]` of
        row i, (B, 1, vocab): the next-token logits of right-padded prompts of different lengths."""
        # Only shapes are checked here, never the ids' values: reading them back would stop a CUDA
        # device on every call and split a compiled graph. Ids are checked where they enter
        # (`llm.tokenizer.check_token_ids`); an id outside the vocabulary that reaches `tok_emb` on CPU
        # is an IndexError.
        if in_idx.dim() != 2:
            raise LLMError(f"token ids must have shape (batch, seq_len), got {tuple(in_idx.shape)}")
        seq_len = in_idx.shape[1]
        start = kv_cache.longest() if kv_cache is not None else 0
        if seq_len == 0:
            raise LLMError("cannot run the model on an empty sequence of token ids")
        if start + seq_len > self.cfg["context_length"]:
            raise LLMError(f"sequence of {start + seq_len} tokens exceeds context_length {self.cfg['context_length']}")
        if kv_cache is not None and seq_len > kv_cache.room():
            raise LLMError(f"KV cache has room for {kv_cache.room()} tokens, got {seq_len}")
        if kv_cache is None:
            positions = torch.arange(seq_len, device=in_idx.device)
        else:
            positions = kv_cache.start(in_idx.shape[0], seq_len, in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        for block in self.trf_blocks:
            x = block(x, kv_cache)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)
        if kv_cache is not None:
            kv_cache.advance(seq_len)
            if not torch.is_grad_enabled() and isinstance(self.out_head, nn.Linear):  # not under a LoRA adapter
                x = self.final_norm(x)
                if 1 < x.shape[0] * x.shape[1] <= ROWS_HEAD_MAX and (
                    last is not None or isinstance(kv_cache, BatchKVCache)
                ):
                    return self._rows_logits(x)
                return self._cached_logits(x)
        return self.out_head(self.final_norm(x))

    def _rows_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head for one position of each of 2 to ROWS_HEAD_MAX rows (`BatchKVCache` decoding, a batched
        prefill's last positions): `weight @ x.T`, which streams the [vocab, emb] weight once for all the rows,
        where `x @ weight.T` (and `_cached_logits`'s copy) runs MKL's general product at about a row's cost
        each: at 4 rows it takes half the time (docs/performance.md, Many prompts at once). One row keeps
        `_cached_logits`, `generate`'s own sums; more rows than ROWS_HEAD_MAX gain nothing from it."""
        b, t, emb = x.shape
        out = (self.out_head.weight @ x.reshape(b * t, emb).t()).t().reshape(b, t, -1)
        return out if self.out_head.bias is None else out + self.out_head.bias

    def _cached_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head for KV-cache decoding, from a transposed copy of its weight.

        Each new token reads the whole [vocab, emb] head for one row of activations; that
        matrix-vector product runs faster on CPU with the weight stored [emb, vocab] (measured in
        bench/bench_generate.py; README, Performance). The copy costs vocab x emb more memory while generating and is
        rebuilt whenever the weight changes (in-place updates bump its version).
        """
        w = self.out_head.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if self._head_t is None or self._head_t[0] != key:
            self._head_t = (key, w.detach().t().contiguous())
        out = x @ self._head_t[1]
        return out if self.out_head.bias is None else out + self.out_head.bias

    @property
    def tied(self) -> bool:
        """Whether the head's weight is the token embedding's Parameter (`tie_embeddings`), looking through
        a LoRA adapter on the head. A new head (a classifier's) is never tied."""
        head = getattr(self.out_head, "linear", self.out_head)  # llm.lora.LinearWithLoRA keeps the layer here
        return head.weight is self.tok_emb.weight

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=p.dtype)

    def new_batch_kv_cache(self, max_len: int | None = None) -> BatchKVCache:
        """An empty `BatchKVCache` whose rows hold up to `max_len` positions (default: the context)."""
        p = self.tok_emb.weight
        return BatchKVCache(self.cfg, max_len or self.cfg["context_length"], device=p.device, dtype=p.dtype)

    def num_params(self, matmul_only: bool = False) -> int:
        """All parameters, or only those used in matrix multiplies (for 6·N FLOPs/token): every matrix
        but the two embeddings, which are looked up, not multiplied. That is the linear layers'
        weights, and LoRA adapters' A and B once `llm.lora` has added them (the norms' scales and
        shifts and the biases are vectors). A tied head's matrix counts once, as a matmul weight."""
        if not matmul_only:
            return sum(p.numel() for p in self.parameters())  # a tied head's matrix once
        # By module, not by tensor: a tied head's matrix is tok_emb's too, and the head multiplies by it.
        seen: set[int] = set()
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                continue
            for p in module.parameters(recurse=False):
                if p.dim() == 2:
                    seen.add(id(p))
        return sum(p.numel() for p in self.parameters() if id(p) in seen)


def flops_per_token(model: GPTModel, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmul weights plus attention's 12·L·d·T."""
    cfg = model.cfg
    return 6.0 * model.num_params(matmul_only=True) + 12.0 * cfg["n_layers"] * cfg["emb_dim"] * seq_len


__all__ = [
    "GPT_CONFIG_124M",
    "PRESETS",
    "model_config",
    "FeedForward",
    "GELU",
    "BatchKVCache",
    "GPTModel",
    "KVCache",
    "LayerNorm",
    "MultiHeadAttention",
    "TransformerBlock",
    "flops_per_token",
]
