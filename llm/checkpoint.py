"""Checkpoints: the one module that reads and writes them (safetensors weights + a JSON config).

A checkpoint is a directory holding `model.safetensors` and `config.json` (the book's seven
config keys under "model", plus what a stage recorded: "training", "instruct", "classifier"…).
Every file is written atomically. Reading also takes the `.safetensors` file itself, a book-style
`.pth`/`.pt` state_dict (read with `weights_only=True`), whose config comes from a `config.json`
beside it or, failing that, from the tensor shapes, and OpenAI's GPT-2 in Hugging Face's layout:
a name (`gpt2-small`…, fetched from the Hub), a directory, `.safetensors` or `pytorch_model.bin`
(`llm.gpt2` recognises and converts it).

Public API:
- `save_checkpoint(model, path, extra)` / `load_checkpoint(path, map_location)`: language models;
- `read_checkpoint(path) -> Checkpoint` (weights, config and metadata, in the book's layout) and
  `Checkpoint.model(map_location, num_classes)`, e.g. for a classifier's head;
- `checkpoint_meta(path)`: what a stage recorded in `config.json`, without reading the weights;
- `export_hf(model, out_dir)`: a Hugging Face GPT-2 directory;
- `save_adapter(...)`: a LoRA adapter checkpoint, a directory of `lora.safetensors` (the adapters and any
  new head) and `lora.json` (rank, alpha, targets, the base model's name, path and sha256); every reader
  above takes it, loading the base, checking its hash and merging the adapters (`llm.lora`);
- `weights_state_dict`, `load_weights`, `reconfigure`, `resolve_checkpoint`.

One other file holds weights: a training run's resume state (`models/resume/<stage>.pt`, never a
stage output), which `llm.resume` writes and reads as its `TrainState`: a `torch.save` dict of the
weights, the optimizer, the position and the RNG states, read with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llm.bounds import MAX_LORA_ALPHA
from llm.config import stored_config
from llm.errors import CheckpointError, ConfigError, LLMError, first_line
from llm.files import atomic_path, atomic_write_bytes
from llm.gpt2 import HF_BIN_NAME, HUB_IDS, book_to_hf, config_from_shapes, from_hf, gpt2_name, hub_download, is_hf_gpt2
from llm.lora import lora_layers, merge_state
from llm.model import MASK_SUFFIX, GPTModel, model_config

WEIGHTS_NAME = "model.safetensors"  # the same file names as Hugging Face's
CONFIG_NAME = "config.json"
_FORMAT = "llm.GPTModel"  # config.json's "format"
ADAPTER_WEIGHTS = "lora.safetensors"
ADAPTER_CONFIG = "lora.json"
_ADAPTER_FORMAT = "llm.LoRA"  # lora.json's "format"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read into memory, in the book's layout whatever its source."""

    state: dict[str, torch.Tensor]  # the book's state_dict keys
    cfg: dict[str, Any]  # the book's model config
    meta: dict[str, Any]  # the parsed config.json ({} when there is none)
    source: Path  # the weights file, named in errors

    def model(self, map_location: str | torch.device = "cpu", num_classes: int | None = None) -> GPTModel:
        """A GPTModel holding these weights, loaded strictly, in eval mode. `num_classes`: the
        weights hold a classification head of that many outputs instead of the language-model head
        (its own: a classifier is never tied)."""
        if num_classes is None:
            model = GPTModel(self.cfg)
        else:
            model = GPTModel({**self.cfg, "tie_embeddings": False})
            model.out_head = nn.Linear(self.cfg["emb_dim"], num_classes)
        load_weights(model, self.state, self.source)
        return model.to(map_location).eval()


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without the book's recomputable attention-mask buffers."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}


def _write(path: Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """`path/model.safetensors` and `path/config.json`; each file appears whole or not at all."""
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(dict(state), tmp, metadata={"format": "pt"})
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return path


def _no_adapters(model: torch.nn.Module, what: str) -> None:
    if lora_layers(model):
        raise CheckpointError(
            f"{what} takes a plain model: this one holds LoRA adapters (save them with save_adapter, "
            "or merge them first with llm.lora.merge_lora)"
        )


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors (names, dtypes, shapes, bytes, in name order), without the book's
    recomputable mask buffers: the same weights hash the same whatever file format they came from."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if not k.endswith(MASK_SUFFIX)):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checkpoint(model: GPTModel, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `path/model.safetensors` and `path/config.json` (the model config and `extra`).

    A tied model (`tie_embeddings`) is written without `out_head.weight`, which is `tok_emb.weight`
    (safetensors refuses two names for one tensor, as Hugging Face's tied GPT-2 files leave out
    `lm_head.weight`); `read_checkpoint` puts it back. The config records whether the head is tied as
    the model is, whatever its `cfg` says (a classifier's new head is not), and only when it is
    (`llm.config.stored_config`: an untied model's config.json is the book's seven keys, as before)."""
    _no_adapters(model, "save_checkpoint")
    state = weights_state_dict(model)
    if model.tied:
        del state["out_head.weight"]
    cfg = stored_config({**model.cfg, "tie_embeddings": model.tied})
    meta = {"format": _FORMAT, "model": cfg, **(dict(extra) if extra else {})}
    return _write(Path(path), state, meta)


def export_hf(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face GPT-2 checkpoint directory (`config.json` + `model.safetensors`)."""
    _no_adapters(model, "export_hf")
    config, state = book_to_hf(model)
    return _write(Path(out_dir), state, config)


def _read_meta(file: Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint: the model config and what stages added to it."""
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read model config {file}: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"cannot read model config {file}: not a JSON object")
    return meta


def _model_config(meta: Mapping[str, Any], file: Path) -> dict[str, Any]:
    """The model config in a checkpoint's parsed `config.json` (`file`, named in errors)."""
    try:
        return model_config(meta.get("model", meta))
    except ConfigError as exc:
        raise CheckpointError(f"bad model config in {file}: {exc}") from None


def _infer_config(state: Mapping[str, torch.Tensor], source: Path) -> dict[str, Any]:
    """A config for a book-style state_dict without a config.json, from its shapes."""
    qkv_bias = "trf_blocks.0.att.W_query.bias" in state
    return config_from_shapes(state, source, "tok_emb.weight", "pos_emb.weight", "trf_blocks.", qkv_bias)


def _unsafe_pickle(file: Path, exc: pickle.UnpicklingError) -> CheckpointError | None:
    """torch's refusal to unpickle more than tensors (`weights_only=True`) as one line; its own
    text advises turning the protection off, which this one never does. None: another error."""
    text = str(exc)
    if not text.startswith("Weights only load failed"):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)  # the code it would import and run
    what = f" (it refers to {found.group(1)})" if found else ", or not a checkpoint at all"
    return CheckpointError(
        f"{file} is not a safe checkpoint{what}: only tensors and plain containers (dicts, lists, "
        "numbers, strings) are allowed in a .pth/.pt/.bin file, and it was not loaded"
    )


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refusal = _unsafe_pickle(file, exc)
        if refusal is not None:
            raise refusal from None
        first = first_line(exc)
        raise CheckpointError(f"cannot read checkpoint {file} (truncated or not a checkpoint?): {first}") from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
        first = first_line(exc)
        raise CheckpointError(f"cannot read checkpoint {file} (truncated or not a checkpoint?): {first}") from None
    except Exception as exc:  # unpickling errors come in many types
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {file}: {type(exc).__name__}: {detail}") from None
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


def _is_gpt2_name(path: str | os.PathLike) -> bool:
    """A GPT-2 name (`gpt2-small`…) that is not also an existing path (the path wins)."""
    return not Path(path).exists() and gpt2_name(str(path)) is not None


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """What was recorded beside a checkpoint's weights: its parsed `config.json` (the model config
    under "model" and what the stage added, e.g. "instruct" or "classifier"), without reading the
    weights; {} for a GPT-2 name or a weights file without a config.json."""
    if _is_gpt2_name(path):
        return {}
    adapter = adapter_dir(path)
    if adapter is not None:
        meta = _adapter_meta(adapter)
        return {"format": _FORMAT, "model": meta["base"]["config"], **_adapter_extras(meta)}
    _, config = resolve_checkpoint(path)
    return _read_meta(config) if config is not None and config.is_file() else {}


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The weights (in the book's names), model config and metadata of a checkpoint or GPT-2 name.

    A path that exists wins over a GPT-2 name of the same spelling.
    """
    if _is_gpt2_name(path):
        path = hub_download(str(path))
    adapter = adapter_dir(path)
    if adapter is not None:
        return _read_adapter(adapter)
    weights, config = resolve_checkpoint(path)
    state = _read_weights(weights)
    meta = _read_meta(config) if config is not None and config.is_file() else None
    if config is not None and meta is None:
        raise CheckpointError(f"checkpoint {Path(path)} has no {CONFIG_NAME}")
    if is_hf_gpt2(state):
        state, cfg = from_hf(state, weights, meta, config)
    elif meta is not None:
        cfg = _model_config(meta, config)
    else:
        cfg = _infer_config(state, weights)
    if cfg["tie_embeddings"] and "out_head.weight" not in state:  # saved once (save_checkpoint): the book's two names
        state["out_head.weight"] = state["tok_emb.weight"]
    return Checkpoint(state, cfg, meta or {}, weights)


# --- LoRA adapter checkpoints -------------------------------------------------------------------
def save_adapter(
    adapter: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    lora: Mapping[str, Any],
    base: str,
    base_sha256: str,
    base_config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write an adapter checkpoint: `path/lora.safetensors` (`llm.lora.adapter_state_dict`: A and B of each
    adapted layer, and the modules that trained in full) and `path/lora.json`: `lora` (rank, alpha, targets,
    modules_to_save), the base model (`base` as given, its path relative to `path` when it is a local
    checkpoint, its `weights_sha256` and config) and `extra` (what the stage records, as in config.json)."""
    path = Path(path)
    local = Path(base).exists()
    relative = os.path.relpath(Path(base).resolve(), path.resolve()) if local else None
    meta = {
        "format": _ADAPTER_FORMAT,
        "lora": dict(lora),
        "base": {"model": str(base), "path": relative, "sha256": base_sha256, "config": stored_config(base_config)},
        **(dict(extra) if extra else {}),
    }
    with atomic_path(path / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, tmp, metadata={"format": "pt"})
    atomic_write_bytes(path / ADAPTER_CONFIG, (json.dumps(meta, indent=2) + "\n").encode())
    return path


def adapter_dir(path: str | os.PathLike) -> Path | None:
    """The adapter checkpoint directory `path` names (the directory, or its lora.json or lora.safetensors),
    or None when it is not one."""
    path = Path(path)
    if path.is_dir():
        return path if (path / ADAPTER_CONFIG).is_file() else None
    if path.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and (path.parent / ADAPTER_CONFIG).is_file():
        return path.parent
    return None


def _adapter_meta(directory: Path) -> dict[str, Any]:
    """lora.json, checked: one line naming the file and the bad entry."""
    file = directory / ADAPTER_CONFIG
    meta = _read_meta(file)
    if meta.get("format") != _ADAPTER_FORMAT:
        raise CheckpointError(f"{file} is not a LoRA adapter config (format {meta.get('format')!r})")
    lora, base = meta.get("lora"), meta.get("base")
    if not isinstance(lora, dict) or not isinstance(base, dict):
        raise CheckpointError(f"{file}: needs 'lora' and 'base' objects")
    # The settings the merge computes with, within params.yaml's bounds: JSON reads `Infinity` and `NaN`
    # as floats, and both fail the comparison; an alpha of 1e308, finite, is far over the bound.
    rank, alpha = lora.get("rank"), lora.get("alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"{file}: lora.rank must be a whole number >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= MAX_LORA_ALPHA:
        raise CheckpointError(
            f"{file}: lora.alpha must be a number > 0, got {alpha!r}; allowed: 0 < alpha <= {MAX_LORA_ALPHA:g}"
        )
    for key in ("model", "sha256"):
        if not isinstance(base.get(key), str):
            raise CheckpointError(f"{file}: base.{key} must be a string")
    if base.get("path") is not None and not isinstance(base["path"], str):
        raise CheckpointError(f"{file}: base.path must be a string or null")
    base["config"] = _model_config({"model": base.get("config")}, file)
    return meta


def _adapter_extras(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a stage recorded beside the adapter ("classifier", "instruct", "training"…) and its LoRA settings."""
    extras = {k: v for k, v in meta.items() if k not in ("format", "lora", "base", "model")}
    return {**extras, "lora": {**meta["lora"], "base": meta["base"]["model"]}}


def _describe(cfg: Mapping[str, Any]) -> str:
    return f"{cfg['n_layers']} layers x {cfg['emb_dim']}, context {cfg['context_length']}, vocab {cfg['vocab_size']}"


def _read_adapter(directory: Path) -> Checkpoint:
    """The merged weights of an adapter checkpoint: its base read and checked against the recorded
    sha256 and shape, then each adapter folded in (W + alpha * (A @ B)^T; `llm.lora.merge_state` refuses
    a tensor that is not floating point, of another shape or rank, or not finite, and a merged weight
    that is not finite)."""
    meta = _adapter_meta(directory)
    base = meta["base"]
    spec: str | Path = (directory / base["path"]) if base.get("path") else base["model"]
    try:
        checkpoint = read_checkpoint(spec)
    except CheckpointError as exc:
        raise CheckpointError(f"adapter {directory}: cannot read its base model {base['model']}: {exc}") from None
    recorded, found = base["config"], checkpoint.cfg
    if any(recorded[k] != found[k] for k in recorded if k != "drop_rate"):
        raise CheckpointError(
            f"adapter {directory} was trained on {base['model']} ({_describe(recorded)}), "
            f"but {spec} is another model ({_describe(found)})"
        )
    sha = weights_sha256(checkpoint.state)
    if sha != base["sha256"]:
        raise CheckpointError(
            f"adapter {directory} was trained on {base['model']} (sha256 {base['sha256'][:12]}), "
            f"but {spec} holds other weights (sha256 {sha[:12]})"
        )
    weights = directory / ADAPTER_WEIGHTS
    adapter = _read_weights(weights)
    try:
        state = merge_state(checkpoint.state, adapter, meta["lora"]["alpha"], str(weights), meta["lora"]["rank"])
    except LLMError as exc:
        raise CheckpointError(str(exc)) from None
    cfg = checkpoint.cfg
    if cfg["tie_embeddings"] and any(k.startswith("out_head.") for k in adapter):
        # The head's adapter (or a new head) changed the head and not the token embedding, which stayed frozen:
        # the merged model computes what was trained only with the two apart (llm.lora.merge_lora does the same).
        cfg = {**cfg, "tie_embeddings": False}
    return Checkpoint(state, cfg, {"format": _FORMAT, "model": cfg, **_adapter_extras(meta)}, weights)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> GPTModel:
    """Build a language model (GPTModel) from a checkpoint or GPT-2 name and load its weights
    strictly (eval mode). A path that exists wins over a GPT-2 name of the same spelling."""
    return read_checkpoint(path).model(map_location)


def load_weights(model: GPTModel, state: Mapping[str, torch.Tensor], source: os.PathLike | str) -> None:
    """Strict `load_state_dict` with a one-line error naming the first mismatching key. A tied model takes
    a state with or without `out_head.weight` (it is `tok_emb.weight`), and refuses one whose head differs
    from its embedding rather than keep either silently."""
    if model.tied and "tok_emb.weight" in state:
        head, emb = state.get("out_head.weight"), state["tok_emb.weight"]
        if head is not None and (head.shape != emb.shape or not torch.equal(head, emb.to(head.device))):
            raise CheckpointError(
                f"{source}: out_head.weight differs from tok_emb.weight, but the model ties them "
                "(tie_embeddings true): load it into an untied model"
            )
        state = {**state, "out_head.weight": emb}
    missing = [k for k in model.state_dict() if k not in state and not k.endswith(MASK_SUFFIX)]
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
    """`model`'s weights in a model of config `cfg`, which may differ in `drop_rate`, use the
    first `context_length` positions of its position embedding (the shape stays otherwise), tie a head
    equal to the token embedding or give a tied head its own copy (`tie_embeddings`)."""
    cfg = model_config(cfg)
    if cfg == model.cfg:
        return model
    state = weights_state_dict(model)  # without the masks, whose size follows context_length
    state["pos_emb.weight"] = state["pos_emb.weight"][: cfg["context_length"]]
    new = GPTModel(cfg)
    load_weights(new, state, "reconfigured model")
    return new.to(next(model.parameters()).device).train(model.training)
