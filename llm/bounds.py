"""The bounds that keep a run possible, each defined once with its reason, and checked where the
value enters: `params.yaml` (`llm.pipeline.params`), the command line (`llm.cli`), the HTTP API
(`llm.serve.schemas`) and the library call (`llm.generate`). Torch-free, like `llm.choices`.
"""

from __future__ import annotations

import math

from llm.errors import ConfigError

MAX_SEED = 2**32 - 1
"""numpy's and pandas' seeds are in [0, 2**32 - 1]; torch takes the same range."""
MAX_LR = 1.0
"""Adam moves every weight by about lr per step: above 1 nothing trains."""
MAX_WEIGHT_DECAY = 1.0
"""AdamW multiplies every weight by 1 - lr * weight_decay per step: the product must stay below 1."""
MAX_TEMPERATURE, MIN_TEMPERATURE = 100.0, 1e-3
"""Logits are divided by the temperature in float32: below MIN_TEMPERATURE they overflow to inf and
the softmax to NaN (0 = greedy); params.yaml also refuses more than MAX_TEMPERATURE."""
MAX_PARAMS = 2_000_000_000
"""The largest model built from scratch: the largest preset, gpt2-xl, builds 1.64 billion parameters (its
head untied, as the book's GPTModel); 2 billion already take 32 GB for the fp32 weights, gradients and AdamW's
two moments."""
MAX_MASK_BYTES = 4 * 2**30
"""Every checkpoint holds the book's attention masks, n_layers float32 context_length x context_length
matrices, built when it is saved: at most 4 GiB of them (GPT-2 XL's: 0.19 GiB)."""
MAX_NPROC_PER_NODE = 256
"""torchrun starts this many processes on one machine, each holding the model, its gradients and AdamW's
moments: one per GPU (8 on the largest nodes) or per core (a 2-socket server has up to 256 threads)."""
MAX_LORA_ALPHA = 1e4
"""The adapter's output is multiplied by alpha: far above the rank-16 alpha of 16 (the book), an update
of lr x alpha per step diverges at once."""
MAX_REPLICATE = 10_000
"""More replicates than anyone runs of one experiment; a bound so a typo (a seed in its place) is caught."""
MAX_CLASSIFY_INPUTS = 2048
"""The most messages one `llm serve` /v1/classify request may send (its `--max-classify-inputs`), as
OpenAI's embeddings API takes at most 2048 inputs per request. Every message is padded to the
classifier's max_length, so this bounds the tokens a request costs as well: 2048 x max_length."""
MAX_DPO_BETA = 100.0
"""DPO's beta (the loss is -log sigmoid(beta * margin)): the notebook suggests 0.1 to 0.5; far above it the
sigmoid saturates at the first step and the loss's gradient vanishes or overflows in float32."""

MIN_STALL_TIMEOUT, STALL_TIMEOUT = 1.0, 60.0
"""`llm serve --stall-timeout` (default STALL_TIMEOUT): /health answers 503 "stalled" once one model step
has run longer. A step is one token, a prompt's whole first pass or a batch of 32 messages to classify:
a 1024-token prompt's first pass through a 124M model took 14 s here on 2 busy cores (raise it for
larger models on CPU). Under a second is no step's time but a typo for milliseconds."""


def stall_timeout_problem(value: float) -> str | None:
    """Why `value` cannot be a stall timeout in seconds, or None: finite and at least MIN_STALL_TIMEOUT."""
    if not (math.isfinite(value) and value >= MIN_STALL_TIMEOUT):
        return f"must be a number of seconds >= {MIN_STALL_TIMEOUT:g}, got {value}"
    return None


MAX_BATCH = 256
"""The most sequences one generation step decodes together (`llm serve --max-batch`, `llm instruct --file
--batch-size`). Each row holds a KV cache of n_layers x 2 x positions x emb_dim floats: 75 MB for GPT-2
124M's full context of 1024 positions, so 256 rows may take 19 GB."""
BATCH_SIZE = 16
"""The sequences `llm.generate.generate_batch` (and so `llm instruct --file`, the stages answering a test set)
decodes at once unless told: beside MAX_BATCH, its one definition. 16 rows decoded 4-5x the tokens per
second of the same prompts one by one, at 124M and mini on one thread (bench/results/generate_batched.md,
shown in docs/performance.md, Many prompts at once)."""


def temperature_problem(value: float) -> str | None:
    """Why `value` cannot be a sampling temperature ("must be ..."), or None when it can: finite,
    0 (greedy) or at least MIN_TEMPERATURE. NaN fails every comparison, so each test holds only for
    an allowed value."""
    if not (math.isfinite(value) and value >= 0):
        return f"must be >= 0 and finite (0 = greedy), got {value}"
    if 0 < value < MIN_TEMPERATURE:
        return (
            f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {value!r}: smaller values overflow float32 logits"
        )
    return None


def top_p_problem(value: float) -> str | None:
    """Why `value` cannot be a nucleus-sampling threshold, or None: in (0, 1] (the most likely
    token is always kept, so a tiny top_p samples it alone)."""
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        return f"must be in (0, 1], got {value}"
    return None


def check_split_sizes(
    section: str, fractions: dict[str, float], sizes: dict[str, int], of: str, batch_size: int
) -> None:
    """The split fractions checked against the data, once a finetuning stage has split it: stop before
    training if a split came out empty, or the first (training) one holds less than one batch, with
    one line naming the fraction settings and every split's size.

    `fractions` maps setting names to values (`{"train_frac": 0.85, "test_frac": 0.1}`), `sizes`
    split names to sizes with the training split first, `of` says what was split ("5 entries of x.json").
    """
    (first, n_train), *_ = sizes.items()
    empty = [name for name, n in sizes.items() if n == 0]
    if not empty and n_train >= batch_size:
        return
    settings = " and ".join(f"{section}.{key} {value}" for key, value in fractions.items())
    got = ", ".join(f"{n:,} {name}" for name, n in sizes.items())
    if empty:
        names = " and ".join([", ".join(empty[:-1]), empty[-1]] if len(empty) > 1 else empty)
        need = f"the {names} split{'s are' if len(empty) > 1 else ' is'} empty"
    else:
        need = f"the {first} split is smaller than one batch of {section}.batch_size = {batch_size}"
    raise ConfigError(f"{settings} split the {of} into {got}: {need}; use more data or other fractions")
