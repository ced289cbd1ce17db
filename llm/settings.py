"""The training loop's settings: one frozen dataclass, torch-free, read by `llm.trainer.Trainer`.

The pipeline's params sections build it (`LoopParams.settings()` in `llm.pipeline.params`); the book's
functions build it from their arguments (`llm.book.ch05.book_loop_settings`). The defaults are the
book's: a constant lr with no warmup, no clipping, no accumulation, fp32, no periodic checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopSettings:
    num_epochs: int
    eval_freq: int  # optimizer steps between evaluations (from step 0)
    eval_iter: int  # batches per evaluation
    # No default: params.yaml's is "auto" (the best device available), the book's functions name theirs,
    # and a Trainer built by hand says where it trains rather than inheriting either.
    device: str
    lr: float = 4e-4
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw (the book) or muon (`llm.optim`)
    batch_size: int = 1  # per process; read by `llm.data.make_loaders`, not by the loop
    seed: int | None = None  # not read by the loop: the caller seeds torch
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    grad_accum_steps: int = 1
    precision: str = "fp32"
    checkpoint_every: int = 0  # optimizer steps between resume states; 0 = only on a stop and at the end
    compile: bool = False  # torch.compile of the training steps (evaluation runs the model itself)
    max_steps: int | None = None  # a step budget instead of epochs (pretraining's `train.max_steps`)
