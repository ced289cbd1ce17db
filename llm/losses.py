"""Loss helpers (chapter 5) shared by every training and evaluation path.

`calc_loss_batch` and `calc_loss_loader` keep the book's names, arguments and return values;
`precision="bf16-mixed"` runs the forward pass under bf16 autocast with fp32 weights and fp32 loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llm.runtime import autocast, to_device


def calc_loss_batch(input_batch, target_batch, model, device, precision: str = "fp32"):
    """Mean next-token cross-entropy of one batch (the book's function)."""
    input_batch, target_batch = to_device(input_batch, device), to_device(target_batch, device)
    with autocast(torch.device(device), precision):
        logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None, precision: str = "fp32", loss_fn=None):
    """Average loss over the first `num_batches` batches (all by default); NaN for an empty loader.

    `loss_fn(model, batch, device, precision)` replaces the next-token loss (e.g. a classifier's).
    """
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    with torch.no_grad():
        for i, batch in enumerate(data_loader):
            if i >= num_batches:
                break
            if loss_fn is None:
                loss = calc_loss_batch(batch[0], batch[1], model, device, precision)
            else:
                loss = loss_fn(model, batch, torch.device(device), precision)
            total += loss.item()
    return total / num_batches


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
