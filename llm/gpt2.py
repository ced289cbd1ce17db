"""OpenAI's GPT-2 on the book's GPTModel: the one module that knows Hugging Face's layout.

GPT-2 checkpoints (Hugging Face layout) store attention and MLP weights as `Conv1D`, i.e.
`[in, out]`, and fuse query/key/value into one `c_attn`; the book's model uses `nn.Linear`
(`[out, in]`) and three separate projections. `hf_to_book` and `book_to_hf` are exact inverses
up to the head: GPT-2 ties `lm_head` to `wte`, the book's model keeps its own `out_head`.

This module converts state_dicts and configs and fetches GPT-2 from the Hub; it reads and writes
no checkpoint files itself: `llm.checkpoint` does, asking `is_hf_gpt2` and `from_hf` here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llm.errors import CheckpointError, first_line
from llm.model import model_config

# Book-style names (chapter 5's `model_configs` keys) and the Hub repositories that hold them.
HUB_IDS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
_ALIASES = {"gpt2": "gpt2-small", **{repo: name for name, repo in HUB_IDS.items()}}
_ALIASES.update({repo.split("/")[1]: name for name, repo in HUB_IDS.items() if name != "gpt2-small"})
HUB_FILES = ("config.json", "model.safetensors")
HF_BIN_NAME = "pytorch_model.bin"  # the weights file of older Hugging Face checkpoints

# GPT-2's head counts by width: the only config a bare state_dict cannot reveal.
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}

# Buffers of older `transformers` versions: a causal mask and a constant, both recomputed here.
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def gpt2_name(spec: str) -> str | None:
    """The canonical name (gpt2-small…) for a GPT-2 name or Hub id, else None."""
    return spec if spec in HUB_IDS else _ALIASES.get(spec)


def is_hf_gpt2(state: Mapping[str, Any]) -> bool:
    """Whether a state_dict uses Hugging Face GPT-2 names (with or without `transformer.`)."""
    return "wte.weight" in state or "transformer.wte.weight" in state


def is_hf_config(meta: Mapping[str, Any]) -> bool:
    """Whether a parsed `config.json` is a Hugging Face `GPT2Config` (not the book's config)."""
    return meta.get("model_type") == "gpt2" or "n_embd" in meta


def config_from_shapes(
    state: Mapping[str, torch.Tensor],
    source: os.PathLike | str,
    embedding: str,
    positions: str,
    blocks: str,
    qkv_bias: bool,
) -> dict[str, Any]:
    """A book-style config from a GPT-2-sized state_dict's shapes: vocabulary and width from the
    `embedding` weight, context from `positions`, layers from the keys under `blocks`, n_heads
    from GPT-2's width table (the one thing shapes cannot tell)."""
    try:
        vocab, emb = state[embedding].shape
        context = state[positions].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{source} is not a GPTModel state_dict: no {exc.args[0]!r}") from None
    n_layers = len({k[len(blocks) :].split(".")[0] for k in state if k.startswith(blocks)})
    if emb not in HEADS_BY_WIDTH:
        raise CheckpointError(
            f"cannot tell n_heads of {source} from its shapes (emb_dim {emb}): "
            "put a config.json with the model config beside it"
        )
    return model_config(
        {
            "vocab_size": int(vocab),
            "context_length": int(context),
            "emb_dim": int(emb),
            "n_heads": HEADS_BY_WIDTH[emb],
            "n_layers": n_layers,
            "drop_rate": 0.0,
            "qkv_bias": qkv_bias,
        }
    )


def from_hf(
    state: Mapping[str, torch.Tensor],
    source: os.PathLike | str,
    meta: Mapping[str, Any] | None = None,
    meta_source: os.PathLike | str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the book's state_dict, the book's config) for a Hugging Face GPT-2 state_dict.

    The config comes from `meta` (the parsed `config.json` beside the weights, named
    `meta_source` in errors) when it is a `GPT2Config`, else from the tensor shapes.
    """
    if meta is not None and is_hf_config(meta):
        cfg = config_from_hf(meta, meta_source if meta_source is not None else source)
    else:
        prefix = "transformer." if "transformer.wte.weight" in state else ""
        cfg = config_from_shapes(state, source, f"{prefix}wte.weight", f"{prefix}wpe.weight", f"{prefix}h.", True)
    return hf_to_book(state, cfg, source), cfg


def config_from_hf(meta: Mapping[str, Any], source: os.PathLike | str) -> dict[str, Any]:
    """The book's config for a Hugging Face `GPT2Config` dict; refuse variants the book's model is not."""
    checks = {
        "activation_function": ("gelu_new", "the book's GELU is the tanh approximation"),
        "layer_norm_epsilon": (1e-5, "the book's LayerNorm uses eps 1e-5"),
        "scale_attn_by_inverse_layer_idx": (False, "the book scales attention by 1/sqrt(head_dim) only"),
        "scale_attn_weights": (True, "the book scales attention by 1/sqrt(head_dim)"),
        "add_cross_attention": (False, "the book's model has no cross-attention"),
    }
    for key, (allowed, why) in checks.items():
        if key in meta and meta[key] != allowed:
            raise CheckpointError(f"{source}: {key} = {meta[key]!r} is not supported ({why}); allowed: {allowed!r}")
    if meta.get("n_inner") not in (None, 4 * meta.get("n_embd", 0)):
        raise CheckpointError(f"{source}: n_inner = {meta['n_inner']} is not supported (the book's MLP is 4 x n_embd)")
    try:
        return model_config(
            {
                "vocab_size": meta["vocab_size"],
                "context_length": meta["n_positions"],
                "emb_dim": meta["n_embd"],
                "n_heads": meta["n_head"],
                "n_layers": meta["n_layer"],
                "drop_rate": 0.0,  # the book loads GPT-2 with drop_rate 0.0 (chapters 5-7)
                "qkv_bias": True,
            }
        )
    except KeyError as exc:
        raise CheckpointError(f"{source}: GPT-2 config lacks {exc.args[0]!r}") from None
    except Exception as exc:
        raise CheckpointError(f"{source}: bad GPT-2 config: {exc}") from None


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("transformer."):
            key = key[len("transformer.") :]
        if not _IGNORED.search(key):
            out[key] = value
    return out


def hf_to_book(state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], source: os.PathLike | str):
    """The book's state_dict for a Hugging Face GPT-2 state_dict and the book's config of it.

    Every tensor's shape is checked against `cfg`; the first wrong or missing key is named.
    """
    hf = _strip_prefix(state)
    d, v, n_ctx = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"]
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"{source} lacks {key!r}: not a GPT-2 checkpoint with {cfg['n_layers']} layers?")
        tensor = hf[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{source}: {key} has shape {list(tensor.shape)}, expected {list(shape)} "
                f"(vocab {v}, context {n_ctx}, width {d})"
            )
        used.add(key)
        return tensor

    out = {"tok_emb.weight": take("wte.weight", (v, d)), "pos_emb.weight": take("wpe.weight", (n_ctx, d))}
    for i in range(cfg["n_layers"]):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        qkv_w = take(h + "attn.c_attn.weight", (d, 3 * d))
        qkv_b = take(h + "attn.c_attn.bias", (3 * d,))
        for name, w, bias in zip(("W_query", "W_key", "W_value"), qkv_w.split(d, dim=1), qkv_b.split(d), strict=True):
            out[b + f"att.{name}.weight"] = w.t()
            out[b + f"att.{name}.bias"] = bias
        out[b + "att.out_proj.weight"] = take(h + "attn.c_proj.weight", (d, d)).t()
        out[b + "att.out_proj.bias"] = take(h + "attn.c_proj.bias", (d,))
        out[b + "ff.layers.0.weight"] = take(h + "mlp.c_fc.weight", (d, 4 * d)).t()
        out[b + "ff.layers.0.bias"] = take(h + "mlp.c_fc.bias", (4 * d,))
        out[b + "ff.layers.2.weight"] = take(h + "mlp.c_proj.weight", (4 * d, d)).t()
        out[b + "ff.layers.2.bias"] = take(h + "mlp.c_proj.bias", (d,))
        for hf_ln, book_ln in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[b + f"{book_ln}.scale"] = take(h + f"{hf_ln}.weight", (d,))
            out[b + f"{book_ln}.shift"] = take(h + f"{hf_ln}.bias", (d,))
    out["final_norm.scale"] = take("ln_f.weight", (d,))
    out["final_norm.shift"] = take("ln_f.bias", (d,))
    # GPT-2 ties its head to the token embedding; an untied export carries lm_head.weight.
    head = "lm_head.weight" if "lm_head.weight" in hf else "wte.weight"
    out["out_head.weight"] = take(head, (v, d))
    extra = sorted(set(hf) - used)
    if extra:
        raise CheckpointError(f"{source} has {extra[0]!r}, which a {cfg['n_layers']}-layer GPT-2 does not have")
    return {k: t.contiguous() for k, t in out.items()}


def book_to_hf(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A Hugging Face `GPT2LMHeadModel` config dict and state_dict with the same function as `model`."""
    cfg = model.cfg
    if model.out_head.weight.shape[0] != cfg["vocab_size"]:
        raise CheckpointError(
            f"only language models export to GPT-2: this model's head has {model.out_head.weight.shape[0]} "
            f"outputs, not vocab_size {cfg['vocab_size']} (a classifier?)"
        )
    sd = {k: t.detach().cpu() for k, t in model.state_dict().items()}
    d = cfg["emb_dim"]
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(cfg["n_layers"]):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        out[h + "attn.c_attn.weight"] = torch.cat(
            [sd[b + f"att.{n}.weight"].t() for n in ("W_query", "W_key", "W_value")], 1
        )
        if cfg["qkv_bias"]:
            out[h + "attn.c_attn.bias"] = torch.cat([sd[b + f"att.{n}.bias"] for n in ("W_query", "W_key", "W_value")])
        else:  # GPT-2 always has the bias; zeros compute the same function
            out[h + "attn.c_attn.bias"] = torch.zeros(3 * d, dtype=sd[b + "att.W_query.weight"].dtype)
        out[h + "attn.c_proj.weight"] = sd[b + "att.out_proj.weight"].t()
        out[h + "attn.c_proj.bias"] = sd[b + "att.out_proj.bias"]
        out[h + "mlp.c_fc.weight"] = sd[b + "ff.layers.0.weight"].t()
        out[h + "mlp.c_fc.bias"] = sd[b + "ff.layers.0.bias"]
        out[h + "mlp.c_proj.weight"] = sd[b + "ff.layers.2.weight"].t()
        out[h + "mlp.c_proj.bias"] = sd[b + "ff.layers.2.bias"]
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[b + "norm1.scale"], sd[b + "norm1.shift"]
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[b + "norm2.scale"], sd[b + "norm2.shift"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["final_norm.scale"], sd["final_norm.shift"]
    tied = torch.equal(sd["out_head.weight"], sd["tok_emb.weight"])
    if not tied:
        out["lm_head.weight"] = sd["out_head.weight"]
    drop = float(cfg["drop_rate"])
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_embd": d,
        "n_head": cfg["n_heads"],
        "n_layer": cfg["n_layers"],
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "attn_pdrop": drop,
        "embd_pdrop": drop,
        "resid_pdrop": drop,
        "scale_attn_weights": True,
        "tie_word_embeddings": tied,
        "bos_token_id": 50256 if cfg["vocab_size"] > 50256 else None,
        "eos_token_id": 50256 if cfg["vocab_size"] > 50256 else None,
        "torch_dtype": str(sd["tok_emb.weight"].dtype).removeprefix("torch."),
    }
    return config, {k: t.contiguous() for k, t in out.items()}


def hub_download(name: str) -> Path:
    """The local snapshot directory of a GPT-2 model from the Hub (downloaded once, then cached).

    Honours `HF_HUB_OFFLINE`, `HF_HOME` and `HF_HUB_CACHE`; offline without a cached copy it
    raises one line that says which files to place where.
    """
    canonical = gpt2_name(name)
    if canonical is None:
        raise CheckpointError(f"{name!r} is not a GPT-2 name; allowed: {', '.join(HUB_IDS)}")
    repo = HUB_IDS[canonical]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency of the project
        raise CheckpointError("huggingface_hub is not installed: pip install huggingface_hub") from None
    try:
        paths = [Path(hf_hub_download(repo, f)) for f in HUB_FILES]
    except Exception as exc:  # offline, no network, gated, disk full: one line, with the way out
        reason = first_line(exc)
        raise CheckpointError(
            f"{canonical}: cannot get {repo} from the Hugging Face Hub and it is not in the cache "
            f"({type(exc).__name__}: {reason[:160]}). Without internet, put {' and '.join(HUB_FILES)} from "
            f"https://huggingface.co/{repo} in a directory DIR and use DIR as the model path"
        ) from None
    return paths[0].parent
