"""`params.yaml` → typed, validated settings: the one place that parses it.

Each section is a pydantic model (`llm.pipeline.validate.Settings`: no unknown keys, no
coercion, no NaN). Every field's default is the committed `params.yaml`'s value (a test keeps
them equal), so a key deleted from the file keeps its documented value. Allowed values come from
the modules that implement them (`llm.model.PRESETS`, `llm.pooling.POOLINGS`,
`llm.prompts.PROMPT_STYLES`, `llm.runtime.PRECISIONS`, `llm.schedule.LR_SCHEDULES`,
`llm.judge.JUDGES`). A bad value stops the stage before any work with one line naming
`section.key`. `params.schema.json`, generated from these models (`python -m llm.pipeline.params`),
lets an editor check params.yaml as you type.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llm.errors import ConfigError
from llm.judge import JUDGES
from llm.model import PRESETS, model_config
from llm.pipeline.validate import Settings, read_yaml, validate
from llm.pooling import POOLINGS
from llm.prompts import PROMPT_STYLES
from llm.runtime import PRECISIONS
from llm.schedule import LR_SCHEDULES

# `init: pretrain` in a stage's section: the pretrain stage's checkpoint.
PRETRAINED = Path("models/pretrain")
SCHEMA = Path("params.schema.json")


def init_source(init: str) -> str:
    """The checkpoint path or GPT-2 name a stage's `init` setting stands for."""
    return str(PRETRAINED) if init == "pretrain" else init


# Keys that fix the shape of the weights: starting from weights, these come from the checkpoint.
SHAPE_KEYS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias")


class DataParams(Settings):
    corpus: list[str] = Field(["the-verdict"], min_length=1)
    """Names in sources.yaml, URLs or local paths; several are joined with <|endoftext|>."""
    train_ratio: float = Field(0.9, gt=0, lt=1)
    """The book's split, on characters."""

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_entry(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class ModelParams(Settings):
    preset: Literal[tuple(PRESETS)] = "mini"
    """A shape from llm.model.PRESETS; keys below that are not null override it."""
    init: str = "scratch"
    """Where pretraining starts: scratch (the book), a GPT-2 name (gpt2-small ... gpt2-xl) or a checkpoint path.
    From weights, the shape is theirs; only drop_rate and a shorter context_length apply."""
    vocab_size: int | None = Field(None, gt=0)
    context_length: int | None = Field(None, gt=0)
    emb_dim: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    drop_rate: float | None = Field(None, ge=0, lt=1)
    qkv_bias: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelParams:
        if self.init in ("", "pretrain"):
            raise ValueError(f"model.init {self.init!r}: allowed: scratch, a GPT-2 name or a checkpoint path")
        try:
            self.config()
        except ConfigError as exc:
            raise ValueError(f"model (preset {self.preset} with overrides): {exc}") from None
        return self

    def config(self) -> dict[str, Any]:
        return model_config({**PRESETS[self.preset], **self.overrides()})

    def overrides(self) -> dict[str, Any]:
        """The model keys set here (not null)."""
        return {
            k: v for k, v in self.model_dump(exclude={"preset", "init"}).items() if v is not None
        }  # fmt: skip

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


class LoopParams(Settings):
    """What `llm.trainer.Trainer` reads: shared by pretraining and both finetuning stages."""

    seed: int = 123
    """Model init (or the new head), data order and dropout all follow from it."""
    num_epochs: int = Field(..., gt=0)
    batch_size: int = Field(..., gt=0)
    lr: float = Field(..., gt=0)
    weight_decay: float = Field(0.1, ge=0)
    eval_freq: int = Field(..., gt=0)
    """Optimizer steps between evaluations."""
    eval_iter: int = Field(..., gt=0)
    """Batches per evaluation."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup; 0 = off (the book)."""
    lr_schedule: Literal[LR_SCHEDULES] = "constant"
    """constant (the book) or cosine (decays to min_lr after the warmup)."""
    min_lr: float = Field(0.0, ge=0)
    """The end of the cosine decay."""
    grad_clip: float = Field(0.0, ge=0)
    """Max global gradient norm; 0 = off (the book)."""
    grad_accum_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    precision: Literal[PRECISIONS] = "fp32"
    device: str = "auto"
    """auto = cuda, then mps, then cpu."""
    checkpoint_every: int = Field(0, ge=0)
    """Optimizer steps between resumable checkpoints; 0 = only on Ctrl-C/SIGTERM."""

    @model_validator(mode="after")
    def _min_lr(self) -> LoopParams:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        return self


class TrainParams(LoopParams):
    num_epochs: int = Field(10, ge=0)
    """0: only measure the starting weights (with model.init) and pass them on."""
    batch_size: int = Field(2, gt=0)
    lr: float = Field(0.0004, gt=0)
    eval_freq: int = Field(5, gt=0)
    """Optimizer steps between evaluations."""
    eval_iter: int = Field(5, gt=0)
    """Batches per evaluation."""
    max_length: int = Field(256, gt=0)
    """Window length = the book's context_length in chapter 5."""
    stride: int = Field(256, gt=0)
    """Non-overlapping windows, as the book."""
    start_context: str = "Every effort moves you"
    """Sample printed after every epoch."""


class EvalParams(Settings):
    init: str = Field("pretrain", min_length=1)
    """The pretrain stage's model, a GPT-2 name or a checkpoint path."""
    prompts: list[str] = Field(["Every effort moves you"], min_length=1)
    max_new_tokens: int = Field(25, gt=0)
    temperature: float = Field(1.4, ge=0)
    """Chapter 5's sampling example; greedy samples are written too."""
    top_k: int | None = Field(25, gt=0)
    seed: int = 123
    eval_batches: int | None = Field(None, gt=0)
    """null = the whole split."""


def _fractions(section: str, a: str, x: float, b: str, y: float) -> None:
    """Two split fractions, each in (0, 1), leaving something for the third split."""
    if not (0 < x < 1 and 0 < y < 1 and x + y < 1):
        raise ValueError(f"{section}.{a} and {b} must be in (0, 1) and sum to less than 1, got {x} and {y}")


class SpamParams(LoopParams):
    init: str = Field("pretrain", min_length=1)
    """The pretrain stage's model, a GPT-2 name or a checkpoint path."""
    balance: bool = True
    """Undersample ham to the 747 spam messages (the book)."""
    train_frac: float = 0.7
    """The book: 1,045 / 149 / 300 messages."""
    validation_frac: float = 0.1
    max_length: int | None = Field(None, gt=0)
    """null = the longest training message (the book: 120 tokens)."""
    trainable_blocks: int = Field(-1, ge=-1)
    """The last N transformer blocks train, with final_norm and the head (the book: 1); -1 = all."""
    pooling: Literal[tuple(POOLINGS)] = "mean"
    """last (the book), last_nonpad or mean."""
    num_epochs: int = Field(3, gt=0)
    """The book: 5."""
    batch_size: int = Field(8, gt=0)
    lr: float = Field(2.0e-4, gt=0)
    """The book: 5.0e-5."""
    eval_freq: int = Field(50, gt=0)
    eval_iter: int = Field(5, gt=0)

    @model_validator(mode="after")
    def _splits(self) -> SpamParams:
        _fractions("finetune_spam", "train_frac", self.train_frac, "validation_frac", self.validation_frac)
        return self


class InstructParams(LoopParams):
    init: str = Field("pretrain", min_length=1)
    """The pretrain stage's model, a GPT-2 name or a checkpoint path (the book: gpt2-medium)."""
    data: str = "instructions"
    """A name in sources.yaml, or a JSON/JSONL file of {instruction, input, output}."""
    train_frac: float = 0.85
    """The book: 935 / 110 / 55 entries."""
    test_frac: float = 0.1
    prompt_style: Literal[tuple(PROMPT_STYLES)] = "alpaca"
    """alpaca (the book) or phi3."""
    mask_prompt: bool = False
    """true: the loss covers the response tokens only (the book's exercise 7.2)."""
    allowed_max_length: int | None = Field(None, gt=0)
    """null = the model's context_length."""
    num_epochs: int = Field(3, gt=0)
    """The book: 2."""
    batch_size: int = Field(8, gt=0)
    lr: float = Field(5.0e-4, gt=0)
    """The book: 5.0e-5 for GPT-2 medium; the small model here learns nothing at that rate."""
    eval_freq: int = Field(20, gt=0)
    """The book: 5; every evaluation costs 2 x eval_iter batches."""
    eval_iter: int = Field(5, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    """The book: 256."""
    eos_id: int | None = Field(50256, ge=0)
    """Stop generating at <|endoftext|> (the book); null = always max_new_tokens."""
    judge: Literal[JUDGES] = "none"
    """ollama: score responses 0-100 with a local Ollama server (the book's judge)."""
    judge_model: str = "llama3"
    judge_url: str = "http://localhost:11434"

    @model_validator(mode="after")
    def _splits(self) -> InstructParams:
        _fractions("finetune_instruct", "train_frac", self.train_frac, "test_frac", self.test_frac)
        return self


class Params(Settings):
    """Every setting of the pipeline, in sections; each stage declares in dvc.yaml the keys it reads."""

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    finetune_spam: SpamParams = SpamParams()
    finetune_instruct: InstructParams = InstructParams()

    @model_validator(mode="after")
    def _window_fits(self) -> Params:
        context = self.model.config()["context_length"]
        if self.model.init == "scratch" and self.train.max_length > context:
            raise ValueError(
                f"train.max_length ({self.train.max_length}) must be <= the model's context_length ({context})"
            )
        return self


def parse_params(raw: Any) -> Params:
    """Validate a parsed params.yaml mapping."""
    if isinstance(raw, dict) and "sources" in raw:
        raise ConfigError("sources belong in sources.yaml, not params.yaml (they are not experiment parameters)")
    return validate(Params, raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    raw = read_yaml(path)
    try:
        return parse_params(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml (draft 2020-12), for editors and `check-jsonschema`."""
    schema = Params.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "params.yaml"}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # python -m llm.pipeline.params > params.schema.json
    sys.stdout.write(schema_text())
