"""The book's model configuration: a dict with its seven keys, validated in one place.

`GPTModel(cfg)` takes the plain dict the book uses (`GPT_CONFIG_124M`); `model_config()` checks
it and fills nothing in silently, so a typo in a key is an error instead of a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm.errors import ConfigError

MODEL_KEYS: dict[str, type] = {
    "vocab_size": int,
    "context_length": int,
    "emb_dim": int,
    "n_heads": int,
    "n_layers": int,
    "drop_rate": float,
    "qkv_bias": bool,
}

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
    # The pipeline's default: GPT_CONFIG_124M's design at a size that pretrains in ~1 minute on 2 CPU cores.
    "mini": {**GPT_CONFIG_124M, "context_length": 256, "emb_dim": 256, "n_heads": 4, "n_layers": 4},
    "gpt-config-124m": GPT_CONFIG_124M,
    "gpt2-small": {**_GPT2_BASE, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {**_GPT2_BASE, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**_GPT2_BASE, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**_GPT2_BASE, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A named shape (`gpt2-small` … `gpt2-xl`, `gpt-config-124m`) with explicit keys on top."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    return model_config({**PRESETS[name], **overrides})


def model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Return a checked copy of a model config, or raise ConfigError naming the bad key."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model config must be a mapping of {', '.join(MODEL_KEYS)}")
    unknown = sorted(set(cfg) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown model config key {unknown[0]!r}; allowed: {', '.join(MODEL_KEYS)}")
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
