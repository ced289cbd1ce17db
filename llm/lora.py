"""LoRA (the book's appendix E): low-rank adapters beside frozen linear layers.

`LoRALayer`, `LinearWithLoRA` and `replace_linear_with_lora` keep the book's names, shapes and
initialisation: `A` is (in_dim, rank), drawn with `kaiming_uniform_(a=sqrt(5))`; `B` is (rank, out_dim),
zeros, so a freshly wrapped model computes exactly what the base model did; the adapter's output is
`alpha * (x @ A @ B)`.

Scaling: the book multiplies by `alpha`, not by `alpha / rank` as the LoRA paper and Hugging Face
`peft` do (`lora_alpha / r`). The book's is kept so that its appendix-E recipe (rank 16, alpha 16,
lr 5e-5) means what it means there; the same adapter in `peft` is `lora_alpha = alpha * rank`
(tests/test_lora.py checks the logits against `peft` that way).

Which layers get adapters is a list of target names (`TARGETS`): `query`, `key`, `value`,
`out_proj` (or `attention` for all four), `feed_forward` (both of each block's linear layers) and
`head` (the output head). `None` = every `nn.Linear`, the book's choice.

Merging: `merge_lora(model)` folds each adapter into its layer's weight (W + alpha * (A @ B)^T) and
puts the plain `nn.Linear` back, so the merged model is an ordinary `GPTModel` that every command,
checkpoint and export takes; `LinearWithLoRA.merge()`/`unmerge()` do the same in place and back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from llm.bounds import MAX_LORA_ALPHA
from llm.choices import LORA_ALL_TARGETS as ALL_TARGETS
from llm.choices import LORA_GROUPS as GROUPS
from llm.choices import LORA_TARGETS as TARGETS
from llm.errors import LLMError

# Target names (`llm.choices.LORA_LEAVES`: a test keeps them equal) → the attribute path of the
# linear layers they select, relative to a block (`trf_blocks.<i>.`) or to the model (`head`).
LEAF_PATHS = {
    "query": ("att.W_query",),
    "key": ("att.W_key",),
    "value": ("att.W_value",),
    "out_proj": ("att.out_proj",),
    "feed_forward": ("ff.layers.0", "ff.layers.2"),
    "head": ("out_head",),
}


class LoRALayer(nn.Module):
    """The book's LoRALayer: `alpha * (x @ A @ B)`, A Kaiming-uniform (in_dim, rank), B zeros (rank, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as for a linear layer's weight
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update to the wrapped layer's weight, in its (out_dim, in_dim) layout."""
        return delta_weight(self.A, self.B, self.alpha)

    def extra_repr(self) -> str:
        return f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.A.shape[1]}, alpha={self.alpha:g}"


def delta_weight(A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * (A @ B)^T: what an adapter adds to an nn.Linear weight of shape (out_dim, in_dim)."""
    return alpha * (A @ B).T


class LinearWithLoRA(nn.Module):
    """The book's LinearWithLoRA: `linear(x) + lora(x)`. `merge()` folds the adapter into the
    linear layer's weight (forward then runs the linear layer alone); `unmerge()` takes it out."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha).to(linear.weight.device)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.merged:
            return out
        # The book's `linear(x) + lora(x)`, with the adapter's product added into the linear layer's output
        # in place: the same sum without two more tensors of the output's size at once (for an adapter on the
        # head, batch x T x vocab floats each; README: LoRA).
        return out.add_((x @ self.lora.A) @ self.lora.B, alpha=self.lora.alpha)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.linear.weight += self.lora.delta_weight().to(self.linear.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.linear.weight -= self.lora.delta_weight().to(self.linear.weight.dtype)
            self.merged = False


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """The leaf target names a list of targets stands for; LLMError on an unknown name or an empty list."""
    names = list(targets)
    if not names:
        raise LLMError(f"LoRA targets are empty: name some of {', '.join(TARGETS)}")
    leaves: list[str] = []
    for name in names:
        if name not in TARGETS:
            raise LLMError(f"unknown LoRA target {name!r}; allowed: {', '.join(TARGETS)}")
        for leaf in GROUPS.get(name, (name,)):
            if leaf not in leaves:
                leaves.append(leaf)
    return tuple(leaves)


def target_paths(n_layers: int, targets: Iterable[str] | None = None) -> set[str]:
    """The qualified names (`trf_blocks.0.att.W_query`…) of a GPTModel's linear layers that `targets` select."""
    leaves = check_targets(ALL_TARGETS if targets is None else targets)
    paths = set()
    for leaf in leaves:
        for rel in LEAF_PATHS[leaf]:
            if leaf == "head":
                paths.add(rel)
            else:
                paths.update(f"trf_blocks.{i}.{rel}" for i in range(n_layers))
    return paths


def replace_linear_with_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] | None = None,
    skip: Iterable[str] = (),
) -> nn.Module:
    """The book's `replace_linear_with_lora`: wrap linear layers in `LinearWithLoRA`, in place,
    visiting children in order (so adapters draw from torch's RNG in the book's order).

    `targets=None` wraps every `nn.Linear`, as the book does; otherwise only the layers those target
    names select (a `GPTModel`'s layout). `skip`: qualified names never wrapped (a new head that
    trains in full). Parameters are not frozen here, as in the book: `apply_lora` does both.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LLMError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= MAX_LORA_ALPHA:
        raise LLMError(f"LoRA alpha must be a number > 0, got {alpha!r}; allowed: 0 < alpha <= {MAX_LORA_ALPHA:g}")
    wanted = None if targets is None else target_paths(_n_layers(model), targets)
    skip = set(skip)

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.Linear):
                if path not in skip and (wanted is None or path in wanted):
                    setattr(module, name, LinearWithLoRA(child, rank, alpha))
            elif not isinstance(child, LinearWithLoRA):
                visit(child, path + ".")

    visit(model, "")
    return model


def _n_layers(model: nn.Module) -> int:
    blocks = getattr(model, "trf_blocks", None)
    if blocks is None:
        raise LLMError("LoRA targets name a GPTModel's layers; give targets=None for another model")
    return len(blocks)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] | None = None,
    modules_to_save: Sequence[str] = (),
) -> nn.Module:
    """Freeze every parameter, add adapters (`replace_linear_with_lora`), and let only the adapters and
    the `modules_to_save` train (peft's name: a new classification head trains in full, without an adapter)."""
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank, alpha, targets, skip=modules_to_save)
    for name in modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad = True
    return model


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer and put the plain `nn.Linear` back, in place (peft's
    `merge_and_unload`): the model computes what it did, without the adapters' extra matmuls.

    A tied model's head (`tie_embeddings`: its weight is the token embedding's) gets its own copy first, and
    the model's config says untied: merged into the shared matrix, the head's update would change the
    token embedding too, which the adapter never trained (`LinearWithLoRA.merge()` alone would)."""
    for name, wrapper in lora_layers(model).items():
        embedding = getattr(getattr(model, "tok_emb", None), "weight", None)
        if name == "out_head" and wrapper.linear.weight is embedding:
            weight = wrapper.linear.weight
            wrapper.linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            model.cfg = {**model.cfg, "tie_embeddings": False}
        wrapper.merge()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, wrapper.linear)
    return model


def adapter_state_dict(model: nn.Module, modules_to_save: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The adapters' `A`/`B` under the wrapped layer's name (`trf_blocks.0.att.W_query.lora.A`) and the
    `modules_to_save` tensors under their own names: what an adapter checkpoint holds."""
    state = {}
    for name, wrapper in lora_layers(model).items():
        if wrapper.merged:
            raise LLMError(f"{name}: the adapter is merged into the weight; unmerge it before saving the adapter")
        state[f"{name}.lora.A"] = wrapper.lora.A.detach().contiguous()
        state[f"{name}.lora.B"] = wrapper.lora.B.detach().contiguous()
    for module in modules_to_save:
        for key, value in model.get_submodule(module).state_dict().items():
            state[f"{module}.{key}"] = value.detach().contiguous()
    return state


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite. `aminmax` propagates NaN and keeps ±inf, and reads the tensor
    once without allocating a mask as `isfinite(t).all()` does: on 2 CPU cores it scans the 124M weights
    a GPT-2-small merge adapts in ~0.05 s, against ~1 s."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def merge_state(
    base: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    alpha: float,
    source: str,
    rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """A base model's state dict with an adapter checkpoint's tensors folded in: W + alpha * (A @ B)^T for
    each adapted layer, and the saved modules' tensors in place of the base's. `source` is named in errors.

    A damaged adapter is refused, one line naming `source` and the tensor, rather than merged into weights
    that answer NaN: a tensor that is not floating point (never cast: an int32 relabelling of float bytes
    casts to nonsense), A and B that do not fit their weight or `rank` (the one lora.json records), a
    tensor that is not finite, and a merged weight that is not (alpha x A @ B overflowing its dtype)."""
    state = dict(base)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        if not value.is_floating_point():
            raise LLMError(f"{source}: {key} is {value.dtype}; an adapter's tensors are floating point")
        if not _finite(value):
            raise LLMError(f"{source}: {key} holds NaN or infinite values")
        layer, dot, part = key.rpartition(".lora.")
        if dot and part in ("A", "B"):
            pairs.setdefault(layer, {})[part] = value
        else:
            state[key] = value  # a saved module's tensor: load_weights checks its shape against the model
    for layer, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LLMError(f"{source}: the adapter of {layer} lacks {'A' if 'A' not in ab else 'B'}")
        key = f"{layer}.weight"
        if key not in state:
            raise LLMError(f"{source}: adapts {layer}, which the base model does not have")
        weight = state[key]
        A, B = ab["A"].to(torch.float32), ab["B"].to(torch.float32)
        fits = A.ndim == B.ndim == 2 and A.shape[1] == B.shape[0] and (B.shape[1], A.shape[0]) == tuple(weight.shape)
        if not fits or (rank is not None and A.shape[1] != rank):
            of_rank = "" if rank is None else f" of rank {rank}"
            raise LLMError(
                f"{source}: the adapter of {layer} (A {tuple(A.shape)}, B {tuple(B.shape)}) does not fit "
                f"its weight {tuple(weight.shape)}{of_rank}"
            )
        merged = (weight.to(torch.float32) + delta_weight(A, B, alpha)).to(weight.dtype)
        if not _finite(merged):
            raise LLMError(
                f"{source}: merging the adapter of {layer} gives {key} NaN or infinite values "
                f"(alpha {alpha:g} x A @ B overflows {weight.dtype}, or the base weight is not finite)"
            )
        state[key] = merged
    return state


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": …, "total": …}: parameters that train, and all of them (adapters included)."""
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


__all__ = [
    "ALL_TARGETS",
    "TARGETS",
    "LoRALayer",
    "LinearWithLoRA",
    "adapter_state_dict",
    "apply_lora",
    "check_targets",
    "count_parameters",
    "delta_weight",
    "lora_layers",
    "merge_lora",
    "merge_state",
    "replace_linear_with_lora",
    "target_paths",
]
