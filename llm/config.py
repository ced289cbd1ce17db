"""The model's config without the model: its keys (the book's seven and `tie_embeddings`), the
book's `GPT_CONFIG_124M` and the presets, the one check of a config (`model_config`), what follows
from a config without building anything (`estimate_params`, `mask_bytes`), and the config of a run
that starts from weights (`config_for_weights`). Torch-free: the settings parser (`llm.pipeline.params`) uses all of it,
`llm.model.GPTModel` builds from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm.errors import ConfigError

# --- the model's config: the book's plain dict with seven keys, checked in one place ------------
# `GPTModel(cfg)` takes the dict the book uses (`GPT_CONFIG_124M`); `model_config()` checks it and
# fills nothing in silently, so a typo in a key is an error instead of a default. The one exception is
# a key added after the book (OPTIONAL_KEYS): a config without it, the book's or an older checkpoint's,
# means the book's model, and `model_config` writes the book's value in.
MODEL_KEYS: dict[str, type] = {
    "vocab_size": int,
    "context_length": int,
    "emb_dim": int,
    "n_heads": int,
    "n_layers": int,
    "drop_rate": float,
    "qkv_bias": bool,
    "tie_embeddings": bool,  # true: out_head.weight is tok_emb.weight, as in GPT-2 (llm.model.GPTModel)
}
# Keys the book's config does not have, and the book's value of each: its own out_head.
OPTIONAL_KEYS: dict[str, Any] = {"tie_embeddings": False}

# Chapter 4's config: GPT-2 small's shape, but untied head, no qkv bias, context 1024.
GPT_CONFIG_124M: dict[str, Any] = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

# OpenAI's GPT-2 shapes (chapter 5): these checkpoints use qkv bias and context 1024.
_GPT2_BASE = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
PRESETS: dict[str, dict[str, Any]] = {
    # The pipeline's default: GPT_CONFIG_124M's design, small enough to pretrain on a laptop CPU (README: timings).
    "mini": {**GPT_CONFIG_124M, "context_length": 256, "emb_dim": 256, "n_heads": 4, "n_layers": 4},
    "gpt-config-124m": GPT_CONFIG_124M,
    "gpt2-small": {**_GPT2_BASE, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {**_GPT2_BASE, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**_GPT2_BASE, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**_GPT2_BASE, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}

# Keys that fix the shape of the weights: starting from weights, these come from the checkpoint.
SHAPE_KEYS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias")
# Keys that decide the model's size (`estimate_params`).
SIZE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")


def model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Return a checked copy of a model config, or raise ConfigError naming the bad key."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model config must be a mapping of {', '.join(MODEL_KEYS)}")
    unknown = sorted(set(cfg) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown model config key {unknown[0]!r}; allowed: {', '.join(MODEL_KEYS)}")
    cfg = {**OPTIONAL_KEYS, **cfg}
    missing = [k for k in MODEL_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"missing model config key {missing[0]!r}")
    out: dict[str, Any] = {}
    for key, kind in MODEL_KEYS.items():
        value = cfg[key]
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"model config {key!r} must be true or false, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config {key!r} must be a positive integer, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"model config {key!r} must be a number, got {value!r}")
            value = float(value)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model config {key!r} must be in [0, 1), got {value!r}")
        out[key] = value
    if out["emb_dim"] % out["n_heads"]:
        raise ConfigError(
            f"model config 'emb_dim' ({out['emb_dim']}) must be divisible by 'n_heads' ({out['n_heads']})"
        )
    return out


def stored_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A model config as a checkpoint records it: a key after the book's only where it differs from the
    book's value. The book's model keeps the book's seven keys in its config.json, as before the key
    existed, so that code older than it reads the checkpoint too; `model_config` fills the key back in."""
    return {k: v for k, v in cfg.items() if k not in OPTIONAL_KEYS or v != OPTIONAL_KEYS[k]}


def estimate_params(cfg: Mapping[str, Any]) -> int:
    """The parameters of `llm.model.GPTModel(cfg)`, from its config alone (nothing allocated)."""
    v, c, d, n = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    block = 12 * d * d + 10 * d + (3 * d if cfg["qkv_bias"] else 0)  # attention, feed-forward, two norms
    head = 0 if cfg.get("tie_embeddings") else d * v  # a tied head is the token embedding, counted once
    return v * d + c * d + n * block + 2 * d + head  # embeddings, blocks, final norm, head


def mask_bytes(cfg: Mapping[str, Any]) -> int:
    """Bytes of the book's attention masks that `state_dict()` builds: one float32 T x T per layer."""
    return cfg["n_layers"] * cfg["context_length"] ** 2 * 4


def config_for_weights(
    weights_cfg: Mapping[str, Any], overrides: Mapping[str, Any], source: str, head_is_embedding: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """The config for training on from weights of config `weights_cfg`, and notes for the user.

    `overrides` are the `model.*` keys params.yaml sets. The shape comes from the weights: a shape
    key set there that disagrees is an error, never silently dropped. `drop_rate` applies;
    `context_length` may shrink (the first positions of the position embedding are kept) but not grow.
    `tie_embeddings` applies where the weights allow it: `head_is_embedding` says whether their head
    equals their token embedding (GPT-2's does: the book copies wte into out_head). True ties such a
    head and refuses any other (one of the two matrices would be thrown away); false gives a tied
    head its own copy, with a note.
    """
    cfg, notes = dict(weights_cfg), []
    shape = ", ".join(f"{k} {weights_cfg[k]}" for k in ("emb_dim", "n_layers", "n_heads", "context_length"))
    notes.append(f"model.init {source}: the shape comes from the weights ({shape}); model.preset is not used")
    for key, value in overrides.items():
        if key == "tie_embeddings":
            tied = weights_cfg.get(key, False) or head_is_embedding
            if value and not tied:
                raise ConfigError(
                    f"model.tie_embeddings = true, but {source}'s out_head differs from its tok_emb: tying would "
                    "throw one of them away; set model.tie_embeddings to false"
                )
            if value and not weights_cfg.get(key, False):
                notes.append(f"model.tie_embeddings: {source}'s head equals its token embedding: they train as one")
            if not value and tied:
                notes.append(f"model.tie_embeddings: false: {source}'s head is its token embedding; out_head "
                             "trains on as a copy of its own (the book)")  # fmt: skip
            cfg[key] = value
            continue
        if key in SHAPE_KEYS and value != weights_cfg[key]:
            raise ConfigError(
                f"model.{key} = {value!r} conflicts with {source}, which has {weights_cfg[key]!r}: "
                f"the shape comes from the weights; set model.{key} to null"
            )
        if key == "context_length" and value > weights_cfg[key]:
            raise ConfigError(
                f"model.context_length = {value} is longer than {source}'s {weights_cfg[key]}: "
                "its position embedding has no rows for the extra positions"
            )
        if value != weights_cfg[key]:
            notes.append(f"model.{key}: {weights_cfg[key]!r} -> {value!r}")
            cfg[key] = value
    return model_config(cfg), notes
