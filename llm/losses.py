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
    return loader_means(data_loader, model, device, num_batches, precision, loss_fn)["loss"]


def split_loss(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A `loss_fn`'s result as (loss, metrics): a loss function may return the loss alone or
    `(loss, {name: tensor})`, metrics of the batch that evaluation averages beside the loss (DPO's rewards)."""
    return out if isinstance(out, tuple) else (out, {})


def loader_means(data_loader, model, device, num_batches=None, precision: str = "fp32", loss_fn=None) -> dict:
    """`{"loss": ..., **metrics}`: the mean over the first `num_batches` batches (all by default) of each
    batch's loss and of the metrics its `loss_fn` reports (`split_loss`), summed in batch order as the
    book does; `{"loss": nan}` for an empty loader."""
    if len(data_loader) == 0:
        return {"loss": float("nan")}
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    totals: dict[str, float] = {"loss": 0.0}
    with torch.no_grad():
        for i, batch in enumerate(data_loader):
            if i >= num_batches:
                break
            if loss_fn is None:
                loss, metrics = calc_loss_batch(batch[0], batch[1], model, device, precision), {}
            else:
                loss, metrics = split_loss(loss_fn(model, batch, torch.device(device), precision))
            totals["loss"] += loss.item()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value.item()
    return {name: total / num_batches for name, total in totals.items()}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
