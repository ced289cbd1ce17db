"""Checkpoints: safetensors weights plus a JSON of the model config, written atomically.

A checkpoint is a directory holding `model.safetensors` and `config.json` (the book's seven
config keys under "model"). `load_checkpoint` also takes the `.safetensors` file itself, or a
book-style `.pth`/`.pt` state_dict (read with `weights_only=True`), whose config comes from a
`config.json` beside it or, failing that, from the tensor shapes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llm.config import model_config
from llm.errors import CheckpointError, ConfigError
from llm.io import atomic_write_bytes
from llm.model import GPTModel

WEIGHTS_NAME = "model.safetensors"
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
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(weights_state_dict(model), tmp, metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def _read_config(file: Path) -> dict[str, Any]:
    meta = read_meta(file)
    try:
        return model_config(meta.get("model", meta))
    except ConfigError as exc:
        raise CheckpointError(f"bad model config in {file}: {exc}") from None


def infer_config(state_dict: Mapping[str, torch.Tensor], source: Path) -> dict[str, Any]:
    """A book-style config from a state_dict's shapes (n_heads from GPT-2's width table)."""
    try:
        vocab, emb = state_dict["tok_emb.weight"].shape
        context = state_dict["pos_emb.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{source} is not a GPTModel state_dict: no {exc.args[0]!r}") from None
    n_layers = len({k.split(".")[1] for k in state_dict if k.startswith("trf_blocks.")})
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
            "qkv_bias": "trf_blocks.0.att.W_query.bias" in state_dict,
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
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"checkpoint directory {path} has no {WEIGHTS_NAME}")
        return weights, path / CONFIG_NAME
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise CheckpointError(f"checkpoint {path}: expected a directory, .safetensors, .pth or .pt file")
    config = path.parent / CONFIG_NAME
    return path, config if config.is_file() else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> GPTModel:
    """Build a GPTModel from a checkpoint and load its weights strictly; the model is in eval mode."""
    weights, config = resolve_checkpoint(path)
    state = _read_weights(weights)
    if config is not None and config.is_file():
        cfg = _read_config(config)
    elif config is not None:
        raise CheckpointError(f"checkpoint {Path(path)} has no {CONFIG_NAME}")
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
