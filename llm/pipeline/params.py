"""`params.yaml` and `sources.yaml` → typed, validated settings: the one place that parses them.

Each section is a dataclass; a key that is unknown, missing, of the wrong type or out of range
stops the stage before any work with one line naming `section.key` and what is allowed.
`sources.yaml` (URLs and sha256s of the public inputs) is not an experiment parameter: only the
download stage reads it, and the other stages find a source's bytes under `data/raw/<name>/`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llm.errors import ConfigError
from llm.model import PRESETS, model_config
from llm.runtime import PRECISIONS


@dataclass(frozen=True)
class Source:
    url: str  # https:// URL, file:// URL or local path
    sha256: str | None = None  # None only for a user's own local files
    member: str | None = None  # for a zip: the file inside it (then sha256 is the member's)


@dataclass(frozen=True)
class DataParams:
    corpus: list[str]  # names from sources.yaml, URLs or local paths, concatenated in order
    train_ratio: float  # the book: 0.90, split on characters


# `init: pretrain` in a stage's section: the pretrain stage's checkpoint.
PRETRAINED = Path("models/pretrain")


def init_source(init: str) -> str:
    """The checkpoint path or GPT-2 name a stage's `init` setting stands for."""
    return str(PRETRAINED) if init == "pretrain" else init


def is_location(entry: str) -> bool:
    """Whether a corpus/data entry is a URL or path rather than the name of a source."""
    return "/" in entry or entry.startswith(("http://", "https://", "file:")) or bool(Path(entry).suffix)


# Keys that fix the shape of the weights: starting from weights, these come from the checkpoint.
SHAPE_KEYS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias")


@dataclass(frozen=True)
class ModelParams:
    preset: str  # a shape from llm.model.PRESETS; keys below that are not null override it
    init: str = "scratch"  # pretrain's start: scratch, a GPT-2 name (gpt2-small...) or a checkpoint path
    vocab_size: int | None = None
    context_length: int | None = None
    emb_dim: int | None = None
    n_heads: int | None = None
    n_layers: int | None = None
    drop_rate: float | None = None
    qkv_bias: bool | None = None

    def config(self) -> dict[str, Any]:
        return model_config({**PRESETS[self.preset], **self.overrides()})

    def overrides(self) -> dict[str, Any]:
        """The model keys set here (not null)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("preset", "init") and getattr(self, f.name) is not None
        }

    def config_for_weights(self, weights_cfg: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
        """The config for training on from weights of config `weights_cfg`, and notes for the user.

        The shape comes from the weights: a shape key set here that disagrees is an error, never
        silently dropped. `drop_rate` applies; `context_length` may shrink (the first positions
        of the position embedding are kept) but not grow.
        """
        cfg, notes = dict(weights_cfg), []
        shape = ", ".join(f"{k} {weights_cfg[k]}" for k in ("emb_dim", "n_layers", "n_heads", "context_length"))
        notes.append(f"model.init {source}: the shape comes from the weights ({shape}); model.preset is not used")
        for key, value in self.overrides().items():
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


@dataclass(frozen=True, kw_only=True)
class LoopParams:
    """What `llm.trainer.Trainer` reads: shared by pretraining and both finetuning stages."""

    seed: int
    num_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    eval_freq: int
    eval_iter: int
    warmup_steps: int = 0  # linear warmup; 0 = off (the book)
    lr_schedule: str = "constant"  # constant (the book) or cosine (decays to min_lr after warmup)
    min_lr: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the book)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"
    device: str = "auto"
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints; 0 = only on interrupt


@dataclass(frozen=True, kw_only=True)
class TrainParams(LoopParams):
    max_length: int
    stride: int
    start_context: str = "Every effort moves you"


@dataclass(frozen=True, kw_only=True)
class SpamParams(LoopParams):
    init: str = "pretrain"  # the pipeline's pretrained model, a GPT-2 name or a checkpoint path
    balance: bool = True  # undersample ham to the spam count (the book)
    train_frac: float = 0.7
    validation_frac: float = 0.1
    max_length: int | None = None  # None = the longest training message (the book)
    trainable_blocks: int = 1  # last N blocks train (the book: 1); -1 = the whole model
    pooling: str = "last"  # last (the book), last_nonpad or mean


@dataclass(frozen=True, kw_only=True)
class InstructParams(LoopParams):
    init: str = "pretrain"  # the pipeline's pretrained model, a GPT-2 name or a checkpoint path
    data: str = "instructions"  # a name in `sources`, or a path to a JSON/JSONL file
    train_frac: float = 0.85  # the book: first 85% train, next 10% test, the rest validation
    test_frac: float = 0.1
    prompt_style: str = "alpaca"  # alpaca (the book) or phi3
    mask_prompt: bool = False  # drop prompt tokens from the loss (the book's exercise 7.2)
    allowed_max_length: int | None = None  # None = the model's context_length (the book: 1024)
    max_new_tokens: int = 256
    eos_id: int | None = 50256  # stop generating at <|endoftext|>; null = always max_new_tokens
    judge: str = "none"  # none or ollama
    judge_model: str = "llama3"
    judge_url: str = "http://localhost:11434"


@dataclass(frozen=True)
class EvalParams:
    prompts: list[str]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    seed: int
    eval_batches: int | None = None  # None = the whole split
    init: str = "pretrain"  # the pipeline's pretrained model, a GPT-2 name or a checkpoint path


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    eval: EvalParams | None = None  # only the eval stage needs it
    finetune_spam: SpamParams | None = None
    finetune_instruct: InstructParams | None = None


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check_type(name, value, inner)
    if value is None:
        raise ConfigError(f"{name} must not be null")
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{name} must be a non-empty list, got {value!r}")
        return [_check_type(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {k: _check_type(f"{name}.{k}", v, inner) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(name, value, hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        # YAML 1.1 (PyYAML) reads 4e-4 and 5e-05 as text, and `dvc exp run -S x=5.0e-5` writes
        # `5e-05`: a number in scientific notation is a number whichever way it was written.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, str):
            raise ConfigError(f"{name} must be a number, got the string {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {hint!r} for {name}")


def _build(prefix: str, raw: Any, cls: type) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key {key}")
            continue
        values[name] = _check_type(key, raw[name], hints[name])
    return cls(**values)


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_fractions(section: str, **fractions: float) -> None:
    """Two split fractions, each in (0, 1), leaving something for the third split."""
    (a, x), (b, y) = fractions.items()
    if not (0 < x < 1 and 0 < y < 1 and x + y < 1):
        raise ConfigError(f"{section}.{a} and {b} must be in (0, 1) and sum to less than 1, got {x} and {y}")


def _validate_loop(section: str, t: LoopParams, allow_zero_epochs: bool = False) -> None:
    _positive(f"{section}.num_epochs", t.num_epochs, allow_zero=allow_zero_epochs)
    for key in ("batch_size", "eval_freq", "eval_iter", "grad_accum_steps"):
        _positive(f"{section}.{key}", getattr(t, key))
    _positive(f"{section}.lr", t.lr)
    for key in ("weight_decay", "warmup_steps", "min_lr", "grad_clip", "checkpoint_every"):
        _positive(f"{section}.{key}", getattr(t, key), allow_zero=True)
    if t.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"{section}.lr_schedule must be constant or cosine, got {t.lr_schedule!r}")
    if t.min_lr > t.lr:
        raise ConfigError(f"{section}.min_lr ({t.min_lr}) must be <= {section}.lr ({t.lr})")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"{section}.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")


def _validate(p: Params) -> None:
    if not 0.0 < p.data.train_ratio < 1.0:
        raise ConfigError(f"data.train_ratio must be in (0, 1), got {p.data.train_ratio}")
    if p.model.preset not in PRESETS:
        raise ConfigError(f"model.preset {p.model.preset!r} is unknown; allowed: {', '.join(PRESETS)}")
    try:
        cfg = p.model.config()
    except ConfigError as exc:
        raise ConfigError(f"model (preset {p.model.preset} with overrides): {exc}") from None
    if p.model.init in ("", "pretrain"):
        raise ConfigError(f"model.init {p.model.init!r}: allowed: scratch, a GPT-2 name or a checkpoint path")
    t = p.train
    _validate_loop("train", t, allow_zero_epochs=True)  # 0: evaluate and keep the initial weights
    _positive("train.max_length", t.max_length)
    _positive("train.stride", t.stride)
    if p.model.init == "scratch" and t.max_length > cfg["context_length"]:
        raise ConfigError(
            f"train.max_length ({t.max_length}) must be <= the model's context_length ({cfg['context_length']})"
        )
    if p.finetune_spam is not None:
        f = p.finetune_spam
        _validate_loop("finetune_spam", f)
        _check_fractions("finetune_spam", train_frac=f.train_frac, validation_frac=f.validation_frac)
        if f.pooling not in ("last", "last_nonpad", "mean"):
            raise ConfigError(f"finetune_spam.pooling must be last, last_nonpad or mean, got {f.pooling!r}")
        _positive("finetune_spam.max_length", f.max_length)
        if f.trainable_blocks < -1:
            raise ConfigError(f"finetune_spam.trainable_blocks must be -1 (all) or >= 0, got {f.trainable_blocks}")
    if p.finetune_instruct is not None:
        f = p.finetune_instruct
        _validate_loop("finetune_instruct", f)
        _check_fractions("finetune_instruct", train_frac=f.train_frac, test_frac=f.test_frac)
        if f.prompt_style not in ("alpaca", "phi3"):
            raise ConfigError(f"finetune_instruct.prompt_style must be alpaca or phi3, got {f.prompt_style!r}")
        if f.judge not in ("none", "ollama"):
            raise ConfigError(f"finetune_instruct.judge must be none or ollama, got {f.judge!r}")
        _positive("finetune_instruct.max_new_tokens", f.max_new_tokens)
        _positive("finetune_instruct.allowed_max_length", f.allowed_max_length)
    if p.eval is not None:
        e = p.eval
        _positive("eval.max_new_tokens", e.max_new_tokens)
        _positive("eval.temperature", e.temperature, allow_zero=True)
        _positive("eval.top_k", e.top_k)
        _positive("eval.eval_batches", e.eval_batches)
        if not e.init:
            raise ConfigError("eval.init is empty: allowed: pretrain, a GPT-2 name or a checkpoint path")


def parse_params(raw: Any) -> Params:
    """Validate a parsed params.yaml mapping; sections beyond data/model/train/eval are ignored here."""
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    if "sources" in raw:
        raise ConfigError("sources belong in sources.yaml, not params.yaml (they are not experiment parameters)")
    hints = typing.get_type_hints(Params)
    sections = {}
    for f in dataclasses.fields(Params):
        if f.name in raw:
            sections[f.name] = _check_type(f.name, raw[f.name], hints[f.name])
        elif f.default is dataclasses.MISSING:
            raise ConfigError(f"missing section {f.name}")
    params = Params(**sections)
    _validate(params)
    return params


def _load(path: str | Path, parse):
    """`parse(yaml of path)`, every error one line naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return parse(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    return _load(path, parse_params)


def parse_sources(raw: Any) -> dict[str, Source]:
    """Validate a parsed sources.yaml: `{name: {url, sha256, member?}}`."""
    sources = _check_type("sources", raw, dict[str, Source])
    for name, src in sources.items():
        if src.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", src.sha256):
            raise ConfigError(f"sources.{name}.sha256 must be 64 hex digits, got {src.sha256!r}")
    return sources


def load_sources(path: str | Path = "sources.yaml") -> dict[str, Source]:
    return _load(path, parse_sources)
