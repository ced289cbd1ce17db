"""The optimizers a training section names (`llm.choices.OPTIMIZERS`): the book's AdamW, or Muon for the
transformer blocks' weight matrices beside AdamW for everything else.

Muon (Jordan et al. 2024, `torch.optim.Muon`) orthogonalizes each matrix's momentum with a few
Newton-Schulz iterations, so every direction of a hidden layer's update moves at the same rate. It only
applies to 2-D weights that are matrices of a linear map inside the network: the token and position
embeddings are lookups, the output head is the logits' own scale and the norms and biases are vectors,
so those stay with AdamW, as in the speedrun records and Moonshot's Muon. Both read the one `lr`: Muon
scales its step with `adjust_lr_fn="match_rms_adamw"` (0.2·sqrt(max(rows, cols))) so that an update's
RMS matches AdamW's, which lets the schedule write one rate into every group.
"""

from __future__ import annotations

from typing import Any

import torch

from llm.choices import OPTIMIZERS
from llm.errors import ConfigError


class Optimizers:
    """Several optimizers stepped as one: what the Trainer calls (`param_groups`, `zero_grad`, `step`,
    `state_dict`, `load_state_dict`) over all of them, in order. Their groups are the optimizers' own dicts,
    so a learning rate written into `param_groups` reaches each."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ConfigError(
                f"the resume state's optimizer is not this run's ({len(self.optimizers)} optimizers): "
                "was it saved with another train.optimizer?"
            )
        for opt, s in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(s)


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as in the book, fused into one kernel where the device supports it.

    The per-parameter (foreach) AdamW step makes many passes over memory; the fused kernel does the
    same update in one (bench/bench_train.py measures the step).
    """
    device = params[0].device.type if params else "cpu"
    fused = device in ("cpu", "cuda", "mps")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def muon_params(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon's, AdamW's) trainable parameters: the 2-D weights inside `model.trf_blocks` (attention and
    feed-forward matrices, LoRA's A and B there) for Muon; everything else for AdamW."""
    blocks = getattr(model, "trf_blocks", None)
    hidden = {id(p) for p in blocks.parameters() if p.dim() == 2} if blocks is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [p for p in trainable if id(p) in hidden], [p for p in trainable if id(p) not in hidden]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, name: str = "adamw"):
    """The optimizer of a training section: `adamw` (the book's `torch.optim.AdamW` over every trainable
    weight) or `muon` (`Optimizers(Muon(blocks' matrices), AdamW(the rest))`)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return adamw([p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    matrices, rest = muon_params(model)
    if not matrices:  # nothing for Muon to do (a model without transformer blocks, or all of them frozen)
        return adamw(rest, lr, weight_decay)
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw(rest, lr, weight_decay)) if rest else muon
