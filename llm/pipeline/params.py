"""`params.yaml` → typed, validated settings: the one place that parses it.

Each section is a pydantic model (`llm.pipeline.validate.Settings`: no unknown keys, no
coercion, no NaN). Every field's default is the committed `params.yaml`'s value (a test keeps
them equal): code may leave keys out (`parse_params`), but the file a stage runs with must write
every key (`load_params`: DVC records the file, not the defaults). Allowed values come from
`llm.choices` and the model presets from `llm.config`, the torch-free modules the implementations
import them from too; bounds that keep a run possible (seeds numpy accepts, an lr AdamW can train
with, a model small enough to build and save) from `llm.bounds`, each with its reason. So parsing
params.yaml imports no torch and no implementation: a stage's code deps (dvc.yaml) are the code it
runs. A bad value stops the stage before any work with one line naming `section.key`.
`params.schema.json`, generated from these models (`python -m llm.pipeline.params`), lets an editor
check params.yaml as you type.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from llm.bounds import (
    MAX_DPO_BETA,
    MAX_LORA_ALPHA,
    MAX_LR,
    MAX_MASK_BYTES,
    MAX_NPROC_PER_NODE,
    MAX_PARAMS,
    MAX_REPLICATE,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_WEIGHT_DECAY,
    temperature_problem,
)
from llm.choices import (
    DEVICE_PATTERN,
    JUDGES,
    LORA_ALL_TARGETS,
    LORA_TARGETS,
    LR_SCHEDULES,
    OPTIMIZERS,
    POOLINGS,
    PRECISIONS,
    PROMPT_STYLES,
)
from llm.config import GPT_CONFIG_124M, PRESETS, SIZE_KEYS, estimate_params, mask_bytes, model_config
from llm.errors import ConfigError
from llm.pipeline.validate import Settings, missing_keys, read_yaml, validate
from llm.settings import LoopSettings

# `init: pretrain` in a stage's section: the pretrain stage's checkpoint; `init: instruct`: the
# instruction stage's (where preference tuning starts).
PRETRAINED = Path("models/pretrain")
STAGE_MODELS = {"pretrain": PRETRAINED, "instruct": Path("models/instruct")}
SCHEMA = Path("params.schema.json")


def init_source(init: str) -> str:
    """The checkpoint path or GPT-2 name a stage's `init` setting stands for."""
    return str(STAGE_MODELS.get(init, init))


# GPT-2's tokenizer (llm.tokenizer.VOCAB_SIZE, EOT_ID; a test keeps them equal), without importing it
# here: every stage reads params, and only some tokenize.
VOCAB_SIZE = GPT_CONFIG_124M["vocab_size"]
EOT_ID = VOCAB_SIZE - 1

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
LearningRate = Annotated[float, Field(gt=0, le=MAX_LR)]


class DataParams(Settings):
    corpus: list[Annotated[str, Field(min_length=1)]] = Field(["the-verdict"], min_length=1)
    """Names in sources.yaml, URLs, local files, directories (every file under one, sorted) or glob patterns;
    the files are joined with <|endoftext|>."""
    train_ratio: float = Field(0.9, gt=0, lt=1)
    """The book's split, on characters."""

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_entry(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class ModelParams(Settings):
    preset: Literal[tuple(PRESETS)] = "mini"
    """A shape from llm.config.PRESETS; keys below that are not null override it."""
    init: str = "scratch"
    """Where pretraining starts: scratch (the book), a GPT-2 name (gpt2-small ... gpt2-xl) or a checkpoint path.
    From weights, the shape is theirs; only drop_rate and a shorter context_length apply."""
    vocab_size: int | None = Field(None, gt=0, le=VOCAB_SIZE)
    """At most GPT-2's 50257 token ids: the tokenizer cannot decode larger ones."""
    context_length: int | None = Field(None, gt=0)
    emb_dim: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    drop_rate: float | None = Field(None, ge=0, lt=1)
    qkv_bias: bool | None = None
    tie_embeddings: bool = False
    """false: the head is a matrix of its own (the book); true: out_head.weight is tok_emb.weight, as in
    GPT-2. From weights, true needs a head equal to their embedding (GPT-2's); false unties a tied one."""

    @model_validator(mode="after")
    def _check(self) -> ModelParams:
        if self.init in ("", "pretrain"):
            raise ValueError(f"model.init {self.init!r}: allowed: scratch, a GPT-2 name or a checkpoint path")
        overrides = self.overrides()
        cfg = {**PRESETS[self.preset], **overrides}

        def named(key: str) -> str:  # where a value comes from: this section or the preset
            return f"model.{key} ({cfg[key]})" if key in overrides else f"preset {self.preset}'s {key} ({cfg[key]})"

        if cfg["emb_dim"] % cfg["n_heads"]:
            raise ValueError(f"model: {named('emb_dim')} must be divisible by {named('n_heads')}")
        if self.init == "scratch":  # from weights, the shape is theirs (checked when they are loaded)
            self._check_size(cfg, overrides, named)
        try:
            self.config()
        except ConfigError as exc:
            raise ValueError(f"model (preset {self.preset} with overrides): {exc}") from None
        return self

    def _check_size(self, cfg: dict[str, Any], overrides: dict[str, Any], named) -> None:
        """Refuse a shape too large to build (MAX_PARAMS) or to save (MAX_MASK_BYTES), before any allocation."""
        n_params = estimate_params(cfg)
        if n_params > MAX_PARAMS:
            keys = ", ".join(f"model.{k}" for k in SIZE_KEYS if k in overrides) or "model.preset"
            raise ValueError(
                f"model: {keys} give {n_params:,} parameters, more than the limit of {MAX_PARAMS:,} "
                f"(preset gpt2-xl: {estimate_params(PRESETS['gpt2-xl']):,}); choose smaller sizes"
            )
        if mask_bytes(cfg) > MAX_MASK_BYTES:
            keys = ", ".join(f"model.{k}" for k in ("context_length", "n_layers") if k in overrides) or "model.preset"
            raise ValueError(
                f"model: {keys}: {named('n_layers')} attention masks of {named('context_length')} squared floats "
                f"take {mask_bytes(cfg) / 2**30:.1f} GiB in every checkpoint, more than the limit of "
                f"{MAX_MASK_BYTES // 2**30} GiB; choose a shorter context_length"
            )

    def config(self) -> dict[str, Any]:
        return model_config({**PRESETS[self.preset], **self.overrides()})

    def overrides(self) -> dict[str, Any]:
        """The model keys set here (not null)."""
        return {
            k: v for k, v in self.model_dump(exclude={"preset", "init"}).items() if v is not None
        }  # fmt: skip


class LoopParams(Settings):
    """The training loop's section, shared by pretraining and both finetuning stages: `settings()` is what
    `llm.trainer.Trainer` reads."""

    seed: Seed = 123
    """Model init (or the new head), data order and dropout all follow from it."""
    num_epochs: int = Field(..., gt=0)
    batch_size: int = Field(..., gt=0)
    lr: LearningRate
    """AdamW's learning rate, in (0, 1]."""
    weight_decay: float = Field(0.1, ge=0, le=MAX_WEIGHT_DECAY)
    """AdamW's decoupled weight decay, in [0, 1]; lr * weight_decay must be < 1."""
    optimizer: Literal[OPTIMIZERS] = "adamw"
    """adamw (the book) or muon: torch.optim.Muon for the transformer blocks' matrices, AdamW for the
    embeddings, head, norms and biases, both at lr (llm/optim.py)."""
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
    device: str = Field("auto", json_schema_extra={"pattern": f"^({DEVICE_PATTERN})$"})
    """auto = cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps."""
    checkpoint_every: int = Field(0, ge=0)
    """Optimizer steps between resumable checkpoints; 0 = only on Ctrl-C/SIGTERM."""
    nproc_per_node: int = Field(1, ge=1, le=MAX_NPROC_PER_NODE)
    """Training processes (DDP, one node); above 1 the stage relaunches itself through torchrun, each process
    training on batch_size examples per micro-batch and its own shard of every epoch."""
    compile: bool = False
    """true: the training steps run torch.compile of the model (compiled on the first step); evaluation and the
    saved weights use the model itself."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError(f"must be one of auto, cpu, cuda, cuda:N, mps; got {value!r}")
        return value

    def settings(self) -> LoopSettings:
        """The loop's settings: this section's fields that `LoopSettings` names (`max_steps` only in `train`;
        `nproc_per_node` is read by `llm.distributed.start`, and a stage's own fields by the stage)."""
        return LoopSettings(**self.model_dump(include={f.name for f in fields(LoopSettings)}))

    @model_validator(mode="after")
    def _min_lr(self) -> LoopParams:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.lr * self.weight_decay >= 1:
            raise ValueError(
                f"weight_decay ({self.weight_decay}) times lr ({self.lr}) must be < 1: AdamW multiplies every "
                "weight by 1 - lr * weight_decay at each step"
            )
        return self


class TrainParams(LoopParams):
    num_epochs: int = Field(10, ge=0)
    """0: only measure the starting weights (with model.init) and pass them on."""
    max_steps: int | None = Field(None, gt=0)
    """A budget of optimizer steps instead of epochs (nanoGPT's max_iters): training stops after it,
    mid-epoch if need be, and the lr schedule spans it; num_epochs is then not read. Tokens trained on =
    max_steps x batch_size x nproc_per_node x grad_accum_steps x max_length. null = num_epochs decides."""
    batch_size: int = Field(2, gt=0)
    lr: LearningRate = 0.0004
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
    prompts: list[Annotated[str, Field(min_length=1)]] = Field(["Every effort moves you"], min_length=1)
    max_new_tokens: int = Field(25, gt=0)
    temperature: float = Field(1.4, ge=0, le=MAX_TEMPERATURE)
    """Chapter 5's sampling example; greedy samples are written too. 0 (greedy) or in [0.001, 100]."""
    top_k: int | None = Field(25, gt=0)
    seed: Seed = 123
    eval_batches: int | None = Field(None, gt=0)
    """null = the whole split."""

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        problem = temperature_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def _fractions(section: str, a: str, x: float, b: str, y: float) -> None:
    """Two split fractions, each in (0, 1), leaving something for the third split."""
    if not (0 < x < 1 and 0 < y < 1 and x + y < 1):
        raise ValueError(f"{section}.{a} and {section}.{b} must be in (0, 1) and sum to less than 1, got {x} and {y}")


class LoraParams(Settings):
    """LoRA (the book's appendix E) for a finetuning stage: only low-rank adapters train (and a new head)."""

    rank: int = Field(0, ge=0)
    """The adapters' rank; 0 = off (full finetuning, as without this section). The book: 16."""
    alpha: float = Field(16.0, gt=0, le=MAX_LORA_ALPHA)
    """The adapter's output is alpha * (x @ A @ B): the book's scaling. In peft (lora_alpha / r) the same
    adapter has lora_alpha = alpha * rank."""
    targets: list[Literal[LORA_TARGETS]] = Field(list(LORA_ALL_TARGETS), min_length=1)
    """The linear layers that get adapters: attention (= query, key, value, out_proj), feed_forward, head, or
    single projections; the default is every linear layer (the book). A new classification head trains in full
    instead of getting an adapter."""

    @field_validator("targets")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        seen = [t for i, t in enumerate(value) if t in value[:i]]
        if seen:
            raise ValueError(f"{seen[0]!r} is listed twice")
        return value


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
    lr: LearningRate = 2.0e-4
    """The book: 5.0e-5."""
    eval_freq: int = Field(50, gt=0)
    eval_iter: int = Field(5, gt=0)
    lora: LoraParams = LoraParams()

    @model_validator(mode="after")
    def _splits(self) -> SpamParams:
        _fractions("finetune_spam", "train_frac", self.train_frac, "validation_frac", self.validation_frac)
        if self.lora.rank and self.trainable_blocks != -1:
            raise ValueError(
                f"finetune_spam.trainable_blocks ({self.trainable_blocks}) chooses what trains in full finetuning; "
                "with lora.rank > 0 only the adapters and the new head train: leave trainable_blocks at -1"
            )
        return self


class InstructParams(LoopParams):
    init: str = Field("pretrain", min_length=1)
    """The pretrain stage's model, a GPT-2 name or a checkpoint path (the book: gpt2-medium)."""
    data: str = Field("instructions", min_length=1)
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
    lr: LearningRate = 5.0e-4
    """The book: 5.0e-5 for GPT-2 medium; the small model here learns nothing at that rate."""
    eval_freq: int = Field(20, gt=0)
    """The book: 5; every evaluation costs 2 x eval_iter batches."""
    eval_iter: int = Field(5, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    """The book: 256."""
    eos_id: int | None = Field(50256, ge=0, le=EOT_ID)
    """Stop generating at this token id, in [0, 50256]: <|endoftext|> (the book); null = always max_new_tokens."""
    judge: Literal[JUDGES] = "none"
    """ollama: score responses 0-100 with a local Ollama server (the book's judge)."""
    judge_model: str = Field("llama3", min_length=1)
    judge_url: str = Field("http://localhost:11434", min_length=1)
    lora: LoraParams = LoraParams()

    @model_validator(mode="after")
    def _splits(self) -> InstructParams:
        _fractions("finetune_instruct", "train_frac", self.train_frac, "test_frac", self.test_frac)
        return self


class DPOParams(LoopParams):
    """Preference tuning with DPO, the book's chapter-7 bonus (`ch07/04_preference-tuning-with-dpo`)."""

    init: str = Field("instruct", min_length=1)
    """Where the policy starts, and the frozen reference it is measured against: the instruction stage's model
    (the book: its GPT-2 medium finetuned in chapter 7), the pretrain stage's, a GPT-2 name or a checkpoint path."""
    data: str = Field("preferences", min_length=1)
    """A name in sources.yaml, or a JSON/JSONL file of {instruction, input, chosen, rejected}."""
    train_frac: float = 0.85
    """The notebook's split, as chapter 7's: 935 / 110 / 55 pairs."""
    test_frac: float = 0.1
    beta: float = Field(0.1, gt=0, le=MAX_DPO_BETA)
    """How far the policy may move from the reference: the loss is -log sigmoid(beta * margin); the book: 0.1
    (the notebook suggests 0.1 to 0.5)."""
    mask_prompt: bool = True
    """true (the book): the log-probabilities cover the answer only, not the prompt."""
    allowed_max_length: int | None = Field(None, gt=0)
    """Pairs are cut to this many tokens; null = the model's context_length (the book: 1024)."""
    num_epochs: int = Field(1, gt=0)
    """The book: 1."""
    batch_size: int = Field(8, gt=0)
    """Pairs per batch (the book: 8)."""
    lr: LearningRate = 2.0e-5
    """The book: 5.0e-6 for GPT-2 medium; the pipeline's small model needs more (docs/dpo.md)."""
    weight_decay: float = Field(0.01, ge=0, le=MAX_WEIGHT_DECAY)
    """The book: 0.01."""
    eval_freq: int = Field(20, gt=0)
    """The book: 5; every evaluation costs 2 x eval_iter batches of the policy."""
    eval_iter: int = Field(5, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    """Tokens per answer to the test instructions, from the reference and the tuned model."""
    eos_id: int | None = Field(50256, ge=0, le=EOT_ID)
    """Stop answering at this token id, in [0, 50256]: <|endoftext|> (the book); null = always max_new_tokens."""
    lora: LoraParams = LoraParams()

    @model_validator(mode="after")
    def _splits(self) -> DPOParams:
        _fractions("finetune_dpo", "train_frac", self.train_frac, "test_frac", self.test_frac)
        return self


def replicate_seed(seed: int, replicate: int) -> int:
    """The seed a section uses in replicate `replicate` of an experiment: the section's own `seed` in
    replicate 0 (the book's numbers), otherwise the first 4 bytes of sha256("seed/replicate"), an
    unrelated seed in [0, 2**32 - 1] that no nearby `seed` value repeats (`seed + replicate` would make
    replicate 1 of seed 123 the same run as replicate 0 of seed 124)."""
    if replicate == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{replicate}".encode()).digest()[:4], "big")


class RuntimeParams(Settings):
    replicate: int = Field(0, ge=0, le=MAX_REPLICATE)
    """Which replicate of the experiment this run is: 0 uses every section's seed as written; r > 0 derives
    every section's seed from (seed, r) (`replicate_seed`), so every random choice of every stage moves
    together. `dvc exp run --queue -S 'runtime.replicate=range(0, 3)'` queues the same experiment under 3
    seeds; `llm compare` reads replicates as the spread that a difference must exceed."""
    threads: int = Field(2, ge=0, le=1024)
    """CPU threads of torch in each process of the stages that run a model (torch.set_num_threads). The
    count decides the last digits of every number those stages write (the order of float sums in CPU
    kernels, `llm.runtime.set_threads`), which is why it is a param: with the same count every run on the
    same kind of machine writes the same bytes, busy or idle. 2, the 2-core machine the committed outputs
    come from, whatever the cores of this one; 0 = torch's default (one per core, or OMP_NUM_THREADS) gives
    each machine its own digits. Per process: 1 for `dvc queue start -j 2` on 2 cores, or under DDP
    with as many processes as cores."""


class Params(Settings):
    """Every setting of the pipeline, in sections; each stage declares in dvc.yaml the keys it reads."""

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    finetune_spam: SpamParams = SpamParams()
    finetune_instruct: InstructParams = InstructParams()
    finetune_dpo: DPOParams = DPOParams()
    runtime: RuntimeParams = RuntimeParams()

    @model_validator(mode="after")
    def _window_fits(self) -> Params:
        context = self.model.config()["context_length"]
        if self.model.init == "scratch" and self.train.max_length > context:
            where = "model.context_length" if self.model.context_length is not None else "the model's context_length"
            raise ValueError(f"train.max_length ({self.train.max_length}) must be <= {where} ({context})")
        return self


SEEDED = ("train", "eval", "finetune_spam", "finetune_instruct", "finetune_dpo")  # the sections with a seed


def parse_params(raw: Any) -> Params:
    """Validate a parsed params.yaml mapping. With `runtime.replicate` r > 0, every section's `seed`
    is the seed of that replicate (`replicate_seed`): stages read it as their seed and need not know."""
    if isinstance(raw, dict) and "sources" in raw:
        raise ConfigError("sources belong in sources.yaml, not params.yaml (they are not experiment parameters)")
    params = validate(Params, raw)
    r = params.runtime.replicate
    if r == 0:
        return params
    sections = {name: getattr(params, name) for name in SEEDED}
    return params.model_copy(
        update={name: s.model_copy(update={"seed": replicate_seed(s.seed, r)}) for name, s in sections.items()}
    )


def load_params(path: str | Path = "params.yaml") -> Params:
    """The params file a stage runs with. Unlike `parse_params` (code that builds settings may leave
    keys to their defaults), the file must write every section and key: DVC records the file, so a
    default it does not show would run unrecorded (a truncated or emptied file would train silently)."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        params = parse_params(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not raw:
        raise ConfigError(f"{path} is empty: it must hold every setting (the committed params.yaml shows them all)")
    missing = missing_keys(Params, raw)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(
            f"{path}: {missing[0]} is missing{more}: write every key, as the committed params.yaml does "
            "(DVC records this file, not the defaults a missing key would take)"
        )
    return params


def json_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml (draft 2020-12), for editors and `check-jsonschema`."""
    schema = Params.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "params.yaml"}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # python -m llm.pipeline.params > params.schema.json
    sys.stdout.write(schema_text())
