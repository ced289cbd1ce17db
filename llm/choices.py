"""The names a setting may take, without the code behind them: torch-free, so that parsing
`params.yaml` (`llm.pipeline.params`) imports no implementation and DVC reruns a stage only when
the code it runs changes.

The code that implements them checks against these same names (`llm.runtime`, `llm.schedule`,
`llm.lora`, `llm.classifier`), so what params.yaml allows and what the code accepts are one list;
where the implementation is a registry of functions (`llm.pooling.POOL`, `llm.prompts.STYLES`,
`llm.lora.LEAF_PATHS`) a test keeps its keys equal to the names. The model presets are
`llm.config`'s, the numeric bounds `llm.bounds`'.
"""

from __future__ import annotations

POOLINGS = ("last", "last_nonpad", "mean")
"""How a classifier reads one prediction out of per-token logits (`llm.pooling`): last is the book's."""
PROMPT_STYLES = ("alpaca", "phi3")
"""How an instruction becomes a prompt (`llm.prompts`): alpaca is the book's, phi3 its exercise 7.1."""
PRECISIONS = ("fp32", "bf16-mixed")
"""What the training step computes in (`llm.runtime.autocast`)."""
LR_SCHEDULES = ("constant", "cosine")
"""constant: the book's fixed rate; cosine: half a cosine from lr down to min_lr after the warmup
(`llm.schedule.lr_at`)."""
OPTIMIZERS = ("adamw", "muon")
"""adamw: the book's, for every weight; muon: `torch.optim.Muon` for the transformer blocks' matrices and
AdamW for the rest (embeddings, head, norms, biases), one lr for both (`llm.optim.make_optimizer`)."""
JUDGES = ("none", "ollama")
"""`finetune_instruct.judge`: none, or the book's judge through a local Ollama server (`llm.judge`)."""

LORA_GROUPS = {"attention": ("query", "key", "value", "out_proj")}
"""LoRA target names that stand for several projections."""
LORA_LEAVES = ("query", "key", "value", "out_proj", "feed_forward", "head")
"""The LoRA target names of single layers (`llm.lora` maps each to its layers' paths)."""
LORA_TARGETS = (*LORA_GROUPS, *LORA_LEAVES)
"""Names a `targets` list may hold; `attention` stands for query, key, value and out_proj."""
LORA_ALL_TARGETS = ("attention", "feed_forward", "head")
"""Every linear layer of a GPTModel: the book's `replace_linear_with_lora`."""

DEVICE_PATTERN = r"auto|cpu|cuda|cuda:[0-9]+|mps"
"""The device names `llm.runtime.select_device` takes: auto = cuda, then mps, then cpu."""
