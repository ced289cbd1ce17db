"""Learning-rate schedules: the names `train.lr_schedule` allows and the rate at each step."""

from __future__ import annotations

import math

# constant: the book's fixed rate; cosine: half a cosine from lr down to min_lr after the warmup.
LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, total_steps: int, s) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup, then constant or cosine to min_lr.

    `s` has `lr`, `min_lr`, `warmup_steps` and `lr_schedule` (a training settings section).
    """
    if s.warmup_steps and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.lr_schedule == "constant":
        return s.lr
    span = max(1, total_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))
