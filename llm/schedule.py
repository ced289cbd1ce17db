"""Learning-rate schedules: the rate at each step for each name of `llm.choices.LR_SCHEDULES`."""

from __future__ import annotations

import math

from llm.choices import LR_SCHEDULES
from llm.errors import ConfigError


def lr_at(step: int, total_steps: int, s) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup, then constant or cosine to min_lr.

    `s` has `lr`, `min_lr`, `warmup_steps` and `lr_schedule` (a training settings section).
    """
    if s.warmup_steps and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {s.lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
    if s.lr_schedule == "constant":
        return s.lr
    span = max(1, total_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))
