"""Checkpoints: safetensors weights plus a JSON of the model config, written atomically.

A checkpoint is a directory holding `model.safetensors` and `config.json` (the book's seven
config keys under "model"). `load_checkpoint` also takes the `.safetensors` file itself, a
book-style `.pth`/`.pt` state_dict (read with `weights_only=True`), whose config comes from a
`config.json` beside it or, failing that, from the tensor shapes, and OpenAI's GPT-2 in Hugging
Face's layout: a name (`gpt2-small`…, fetched from the Hub), a directory, `.safetensors` or
`pytorch_model.bin` (see `llm.gpt2`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llm.errors import CheckpointError, ConfigError
from llm.gpt2 import HUB_IDS, config_from_hf, gpt2_name, hf_to_book, hub_download, is_hf_config, is_hf_gpt2
from llm.io import atomic_path, atomic_write_bytes
from llm.model import GPTModel, model_config

WEIGHTS_NAME = "model.safetensors"
HF_BIN_NAME = "pytorch_model.bin"  # older Hugging Face checkpoints
CONFIG_NAME = "config.json"
FORMAT = "llm.GPTModel"

# GPT-2's head counts by width: the only config a bare state_dict cannot reveal.
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without the book's recomputable attention-mask buffers."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith(".att.mask")}


def save_checkpoint(model: GPTModel, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `path/model.safetensors` and `path/config.json`; each file appears whole or not at all."""
    path = Path(path)
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(weights_state_dict(model), tmp, metadata={"format": "pt"})
    meta = {"format": FORMAT, "model": model.cfg, **(dict(extra) if extra else {})}
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return path


def read_meta(file: Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint: the model config and what stages added to it."""
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read model config {file}: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"cannot read model config {file}: not a JSON object")
    return meta


def _read_config(file: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model config in a checkpoint's `config.json` (`meta`: the file, already parsed)."""
    meta = read_meta(file) if meta is None else meta
    try:
        return model_config(meta.get("model", meta))
    except ConfigError as exc:
        raise CheckpointError(f"bad model config in {file}: {exc}") from None


def infer_config(state_dict: Mapping[str, torch.Tensor], source: Path) -> dict[str, Any]:
    """A book-style config from a state_dict's shapes (n_heads from GPT-2's width table).

    Takes the book's names or Hugging Face GPT-2's (with or without `transformer.`).
    """
    hf = is_hf_gpt2(state_dict)
    prefix = "transformer." if "transformer.wte.weight" in state_dict else ""
    emb_key, pos_key, blocks = (
        (f"{prefix}wte.weight", f"{prefix}wpe.weight", f"{prefix}h.")
        if hf
        else ("tok_emb.weight", "pos_emb.weight", "trf_blocks.")
    )
    try:
        vocab, emb = state_dict[emb_key].shape
        context = state_dict[pos_key].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{source} is not a GPTModel state_dict: no {exc.args[0]!r}") from None
    n_layers = len({k[len(blocks) :].split(".")[0] for k in state_dict if k.startswith(blocks)})
    if emb not in _HEADS_BY_WIDTH:
        raise CheckpointError(
            f"cannot tell n_heads of {source} from its shapes (emb_dim {emb}): "
            f"put a {CONFIG_NAME} with the model config beside it"
        )
    return model_config(
        {
            "vocab_size": int(vocab),
            "context_length": int(context),
            "emb_dim": int(emb),
            "n_heads": _HEADS_BY_WIDTH[emb],
            "n_layers": n_layers,
            "drop_rate": 0.0,
            "qkv_bias": hf or "trf_blocks.0.att.W_query.bias" in state_dict,
        }
    )


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {file} (truncated or not a checkpoint?): {first}") from None
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {file}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, Mapping) and "model_state_dict" in state:  # the book's training checkpoints
        state = state["model_state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file} does not hold a state_dict")
    return dict(state)


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, config file or None) for a checkpoint directory or weights file."""
    path = Path(path)
    if not path.exists():
        names = ", ".join(HUB_IDS)
        raise CheckpointError(f"checkpoint {path} does not exist (and it is not a GPT-2 name: {names})")
    if path.is_dir():
        for name in (WEIGHTS_NAME, HF_BIN_NAME):
            if (path / name).is_file():
                return path / name, path / CONFIG_NAME
        raise CheckpointError(f"checkpoint directory {path} has no {WEIGHTS_NAME} (nor {HF_BIN_NAME})")
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise CheckpointError(f"checkpoint {path}: expected a directory, .safetensors, .pth, .pt or .bin file")
    config = path.parent / CONFIG_NAME
    return path, config if config.is_file() else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> GPTModel:
    """Build a GPTModel from a checkpoint or GPT-2 name and load its weights strictly (eval mode).

    A path that exists wins over a GPT-2 name of the same spelling.
    """
    if not Path(path).exists() and gpt2_name(str(path)):
        path = hub_download(str(path))
    weights, config = resolve_checkpoint(path)
    state = _read_weights(weights)
    meta = read_meta(config) if config is not None and config.is_file() else None
    if config is not None and meta is None:
        raise CheckpointError(f"checkpoint {Path(path)} has no {CONFIG_NAME}")
    if is_hf_gpt2(state):
        cfg = config_from_hf(meta, config) if meta is not None and is_hf_config(meta) else infer_config(state, weights)
        state = hf_to_book(state, cfg, weights)
    elif meta is not None:
        cfg = _read_config(config, meta)
    else:
        cfg = infer_config(state, weights)
    model = GPTModel(cfg)
    load_weights(model, state, weights)
    return model.to(map_location).eval()


def load_weights(model: GPTModel, state: Mapping[str, torch.Tensor], source: os.PathLike | str) -> None:
    """Strict `load_state_dict` with a one-line error naming the first mismatching key."""
    missing = [k for k in model.state_dict() if k not in state and not k.endswith(".att.mask")]
    if missing:
        raise CheckpointError(f"{source} lacks {missing[0]!r} (and {len(missing) - 1} more keys)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CheckpointError(
            f"{source} does not fit the model: {detail[1] if len(detail) > 1 else detail[0]}"
        ) from None


def reconfigure(model: GPTModel, cfg: Mapping[str, Any]) -> GPTModel:
    """`model`'s weights in a model of config `cfg`, which may differ in `drop_rate` or use the
    first `context_length` positions of its position embedding (the shape stays otherwise)."""
    cfg = model_config(cfg)
    if cfg == model.cfg:
        return model
    state = weights_state_dict(model)  # without the masks, whose size follows context_length
    state["pos_emb.weight"] = state["pos_emb.weight"][: cfg["context_length"]]
    new = GPTModel(cfg)
    load_weights(new, state, "reconfigured model")
    return new.to(next(model.parameters()).device).train(model.training)
