"""Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), the
book's chapter-7 bonus: preference pairs, their batches, the log-probability of a response and the
DPO loss.

A preference entry is a chapter-7 instruction ({instruction, input}) with two answers, `chosen`
and `rejected`. DPO tunes a policy model so that, relative to a frozen reference copy of its
starting weights, it raises the probability of the chosen answer over the rejected one:
loss = -log sigmoid(beta * ((policy_chosen - policy_rejected) - (reference_chosen - reference_rejected))),
where each term is a sequence's mean log-probability over its response tokens.

Everything here gives the book's notebook (`ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb`)
token for token and float for float; `llm.book.ch07_dpo` wraps it with the notebook's names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from llm.prompts import format_input, response_header
from llm.runtime import autocast, to_device
from llm.tokenizer import EOT_ID

PAIR = ("chosen", "rejected")


class PreferenceDataset(Dataset):
    """The notebook's dataset: each entry's prompt, prompt + chosen and prompt + rejected answer,
    tokenized once.

    The prompt is the book's Alpaca prompt (`format_input`), and an answer follows it after
    "\\n\\n### Response:\\n", as in chapter 7. Items are dicts of token-id lists,
    `{"prompt": [...], "chosen": [...], "rejected": [...]}`. An "<|endoftext|>" inside a text is
    read as plain text (as `InstructionDataset` reads it), where the notebook's `tokenizer.encode`
    raises.
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], tokenizer):
        self.data = data
        prompts = [format_input(entry) for entry in data]
        header = response_header("alpaca")
        encode = lambda texts: tokenizer.encode_batch(texts, disallowed_special=())  # noqa: E731
        encoded = {
            "prompt": encode(prompts),
            **{key: encode([p + header + entry[key] for p, entry in zip(prompts, data, strict=True)]) for key in PAIR},
        }
        self.encoded_texts = [
            {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            for prompt, chosen, rejected in zip(encoded["prompt"], encoded["chosen"], encoded["rejected"], strict=True)
        ]

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.data)


def collate_preferences(
    batch: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int = EOT_ID,
    allowed_max_length: int | None = None,
    mask_prompt_tokens: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The notebook's collate: a batch of `PreferenceDataset` items as tensors.

    `chosen` and `rejected` are padded with `pad_token_id` to one common length, one more than the
    longest of either (so every row ends in at least one pad), then cut to `allowed_max_length`;
    `chosen_mask` and `rejected_mask` (bool, same shape) select the tokens whose log-probabilities
    count: not the padding and, with `mask_prompt_tokens`, not the prompt and the two newline
    tokens after it (the "### Response:\\n" tokens stay in, as in the notebook). `prompt` is the
    list of each item's prompt ids, unpadded, left on the CPU as the notebook leaves it.
    """
    length = max(len(item[key]) + 1 for item in batch for key in PAIR)
    out: dict[str, Any] = {"prompt": [torch.tensor(item["prompt"]) for item in batch]}
    masks = {}
    for key in PAIR:
        ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, item in enumerate(batch):
            n = len(item[key])
            ids[row, :n] = torch.tensor(item[key], dtype=torch.long)
            start = len(item["prompt"]) + 2 if mask_prompt_tokens else 0
            mask[row, start:n] = True
        out[key], masks[f"{key}_mask"] = ids, mask
    out.update(rejected_mask=masks["rejected_mask"], chosen_mask=masks["chosen_mask"])  # the notebook's key order
    for key in (*PAIR, "chosen_mask", "rejected_mask"):
        if allowed_max_length is not None:
            out[key] = out[key][:, :allowed_max_length]
        out[key] = out[key].to(device)
    return out


def sequence_logprobs(logits: Tensor, labels: Tensor, selection_mask: Tensor | None = None) -> Tensor:
    """Each row's mean log-probability of its own tokens, shape (batch,): the notebook's
    `compute_logprobs`.

    `logits` (batch, T, vocab) come from a forward pass over `labels` (batch, T); position t
    scores token t + 1, so the first token is never scored. With `selection_mask` (batch, T) the
    mean runs over the selected tokens only (the mask's first column is ignored with the first
    token); a row that selects none gives NaN, as in the notebook.
    """
    labels = labels[:, 1:]
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)
    selected = torch.gather(log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    if selection_mask is None:
        return selected.mean(-1)
    mask = selection_mask[:, 1:]
    return (selected * mask).sum(-1) / mask.sum(-1)


def pair_logprobs(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) mean response log-probabilities of `model` on a collated batch, shape
    (batch,) each: two forward passes, chosen first (the order the notebook draws dropout in)."""
    return tuple(sequence_logprobs(model(batch[key]), batch[key], batch[f"{key}_mask"]) for key in PAIR)


class DPOTerms(NamedTuple):
    """The DPO loss of each pair and the rewards it is made of, shape (batch,) each."""

    losses: Tensor
    """-log sigmoid(beta * (chosen_reward - rejected_reward)), differentiable in the policy."""
    chosen_rewards: Tensor
    """policy - reference log-probability of the chosen answer, detached (not scaled by beta, as
    the notebook tracks it)."""
    rejected_rewards: Tensor
    """The same for the rejected answer."""


def dpo_loss(
    policy_chosen_logprobs: Tensor,
    policy_rejected_logprobs: Tensor,
    reference_chosen_logprobs: Tensor,
    reference_rejected_logprobs: Tensor,
    beta: float = 0.1,
) -> DPOTerms:
    """The DPO loss (Eq. 7 of the paper) of each pair, computed as the notebook's
    `compute_dpo_loss` does before it averages over the batch (the notebook suggests a `beta`
    between 0.1 and 0.5)."""
    model_logratios = policy_chosen_logprobs - policy_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    losses = -F.logsigmoid(beta * (model_logratios - reference_logratios))
    chosen_rewards = (policy_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (policy_rejected_logprobs - reference_rejected_logprobs).detach()
    return DPOTerms(losses, chosen_rewards, rejected_rewards)


# --- the pipeline's DPO: the Trainer's loss, the cached reference, the metrics ---------------------
def response_logprobs(logits: Tensor, labels: Tensor, selection_mask: Tensor) -> Tensor:
    """`sequence_logprobs` with a mask, computed as a fused cross-entropy: no (batch, T, vocab) tensor of
    log-probabilities is written (the notebook's `log_softmax` + `gather` writes one). Equal to it up to
    the order of float sums (about 1e-7); the logits are read in float32 (under bf16 autocast too)."""
    batch, length = labels.shape
    targets = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, reduction="none")
    mask = selection_mask[:, 1:].to(nll.dtype)
    return -(nll.view(batch, length - 1) * mask).sum(-1) / mask.sum(-1)


REFERENCE = ("reference_chosen", "reference_rejected")


class DPOLoss:
    """The DPO loss as the `llm.trainer.Trainer`'s `loss_fn`: `(model, batch, device, precision) ->
    (mean loss, metrics)`, the metrics being the batch's means of `chosen_reward` and `rejected_reward`
    (what the notebook's loop tracks), `reward_margin` (their difference) and `preference_accuracy` (the
    share of pairs whose chosen reward is the higher); the Trainer trains on the loss and averages all
    of them at each evaluation.

    The reference's log-probabilities come from `reference` (the notebook: a frozen model run on every
    batch, chosen then rejected) or, without one, from the batch itself (`reference_chosen`,
    `reference_rejected`: `cached_reference` computed them once per example, which saves two of the
    notebook's four forward passes per step). `joint` runs chosen and rejected through the policy as one
    batch of 2 x B rows (one forward and one backward instead of two of each) and reads the logits with
    `response_logprobs`; off, the policy runs twice as the notebook does (its dropout draws in its order,
    its floats bit for bit).
    """

    def __init__(self, beta: float, reference: torch.nn.Module | None = None, joint: bool = False):
        self.beta, self.reference, self.joint = beta, reference, joint

    def policy_logprobs(self, model, batch, device, precision) -> tuple[Tensor, Tensor]:
        keys = (*PAIR, "chosen_mask", "rejected_mask")
        on_device = {key: to_device(batch[key], device) for key in keys}
        if not self.joint:
            with autocast(torch.device(device), precision):
                return pair_logprobs(model, on_device)
        ids = [on_device[key] for key in PAIR]
        both, mask = torch.cat(ids), torch.cat([on_device[f"{key}_mask"] for key in PAIR])
        with autocast(torch.device(device), precision):
            logits = model(both)
        logprobs = response_logprobs(logits, both, mask)
        return logprobs[: len(ids[0])], logprobs[len(ids[0]) :]

    def reference_logprobs(self, batch, device, precision) -> tuple[Tensor, Tensor]:
        if self.reference is None:
            return tuple(to_device(batch[key], device) for key in REFERENCE)
        with torch.no_grad():
            return DPOLoss(self.beta, joint=self.joint).policy_logprobs(self.reference, batch, device, precision)

    def terms(self, model, batch, device, precision) -> DPOTerms:
        policy = self.policy_logprobs(model, batch, device, precision)
        reference = self.reference_logprobs(batch, device, precision)
        return dpo_loss(*policy, *reference, beta=self.beta)

    def __call__(self, model, batch, device, precision="fp32") -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.terms(model, batch, device, precision)
        chosen, rejected = terms.chosen_rewards, terms.rejected_rewards
        metrics = {
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(),
            "preference_accuracy": (chosen > rejected).float().mean(),
        }
        return terms.losses.mean(), metrics


def count_pairs(batch: Mapping[str, Any]) -> tuple[int, int]:
    """The Trainer's `count_fn` for preference batches: (tokens, examples) as the notebook counts them,
    the chosen rows' tokens (padding included) and the pairs."""
    return batch["chosen"].numel(), len(batch["chosen"])


class CachedReference(Dataset):
    """A `PreferenceDataset` whose items carry the reference model's log-probabilities of their chosen
    and rejected answers (`reference_chosen`, `reference_rejected`), computed once by `cached_reference`:
    the reference never changes, so the notebook's two reference passes per step are read, not run."""

    def __init__(self, dataset: Dataset, logprobs: Tensor):
        if logprobs.shape != (len(dataset), 2):
            raise ValueError(f"expected ({len(dataset)}, 2) log-probabilities, got {tuple(logprobs.shape)}")
        self.dataset, self.logprobs = dataset, logprobs.detach().cpu().float()

    def __getitem__(self, index: int) -> dict[str, Any]:
        chosen, rejected = self.logprobs[index].tolist()
        return {**self.dataset[index], "reference_chosen": chosen, "reference_rejected": rejected}

    def __len__(self) -> int:
        return len(self.dataset)


def collate_with_reference(batch: Sequence[Mapping[str, Any]], **collate_kwargs) -> dict[str, Any]:
    """`collate_preferences` of `CachedReference` items, with their reference log-probabilities as
    float32 tensors (batch,) under `reference_chosen` and `reference_rejected`; of `PreferenceDataset`
    items (before the reference is cached), `collate_preferences`."""
    out = collate_preferences(batch, **collate_kwargs)
    for key in REFERENCE:
        if batch and key in batch[0]:
            out[key] = torch.tensor([item[key] for item in batch], dtype=torch.float32)
    return out


def cached_reference(
    model: torch.nn.Module, dataset: Dataset, collate_fn, batch_size: int, device, precision: str = "fp32"
) -> CachedReference:
    """`dataset` with the log-probabilities of `model` (the reference: the starting weights) computed once,
    in eval mode without gradients, in batches of `batch_size` in the dataset's order (a pair's value does
    not depend on the batch it was computed in beyond the order of float sums: right padding never reaches
    a response token under the causal mask). The model's mode is restored."""
    was_training = model.training
    model.eval()
    rows = []
    loss = DPOLoss(beta=0.0, joint=True)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            rows.append(torch.stack(loss.policy_logprobs(model, batch, device, precision), dim=1).cpu())
    model.train(was_training)
    logprobs = torch.cat(rows) if rows else torch.zeros((0, 2))
    return CachedReference(dataset, logprobs)


def preference_metrics(
    model: torch.nn.Module | None, dataset: CachedReference, collate_fn, batch_size: int, beta: float, device,
    precision: str = "fp32",
) -> dict[str, float]:  # fmt: skip
    """The metrics of `model` as a policy against the cached reference, over every pair of `dataset`
    (means over pairs, not batches): `loss` (DPO), `chosen_reward` and `rejected_reward` (policy minus
    reference log-probability, the notebook's), `reward_margin` (their difference), `preference_accuracy`
    (the share of pairs whose chosen reward beats the rejected one), and the model's own preference,
    which the reference has too: `logprob_margin` (mean log-probability of the chosen answer minus the
    rejected one) and `logprob_accuracy` (the share of pairs where the chosen one is the likelier).
    `model` None: the reference itself, read from the cache without a forward pass (loss ln 2; rewards,
    margin and preference accuracy 0)."""
    reference = dataset.logprobs
    if model is None:
        return summarize_pairs(reference, reference, beta)
    was_training = model.training
    model.eval()
    loss, rows = DPOLoss(beta, joint=True), []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            rows.append(torch.stack(loss.policy_logprobs(model, batch, device, precision), dim=1).float().cpu())
    model.train(was_training)
    return summarize_pairs(torch.cat(rows) if rows else torch.zeros((0, 2)), reference, beta)


def summarize_pairs(policy: Tensor, reference: Tensor, beta: float) -> dict[str, float]:
    """`preference_metrics` from the (chosen, rejected) log-probabilities of the policy and the reference,
    shape (pairs, 2) each; {} without pairs."""
    if not len(policy):
        return {}
    terms = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=beta)
    chosen, rejected = terms.chosen_rewards.double(), terms.rejected_rewards.double()
    own = policy.double()
    return {
        "loss": terms.losses.double().mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "preference_accuracy": (chosen > rejected).double().mean().item(),
        "logprob_margin": (own[:, 0] - own[:, 1]).mean().item(),
        "logprob_accuracy": (own[:, 0] > own[:, 1]).double().mean().item(),
    }


def load_preferences(path, what: str = "") -> list[dict[str, str]]:
    """A JSON list or JSONL file of {instruction, input?, chosen, rejected} entries (the notebook's
    `instruction-data-with-preference.json`; its `output` is not read), checked entry by entry: errors
    name the file, after `what` (the setting) when given, and the entry."""
    from llm.errors import LLMError
    from llm.instruct import load_instructions

    data = load_instructions(path, require_output=False, what=what)
    name = f"{what} {path}" if what else str(path)
    for i, entry in enumerate(data):
        for key in PAIR:
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise LLMError(f"{name}: entry {i} needs a non-empty string {key!r} (the {key} answer)")
    return data


def response_tokens(item: Mapping[str, Sequence[int]], key: str, max_length: int | None, mask_prompt: bool) -> int:
    """How many tokens of `item[key]` the collated batch scores (`collate_preferences`, then
    `sequence_logprobs`, which never scores the first token): 0 when truncation leaves no answer."""
    n = len(item[key]) if max_length is None else min(len(item[key]), max_length)
    start = len(item["prompt"]) + 2 if mask_prompt else 0
    return max(0, n - max(start, 1))


def usable_pairs(dataset: PreferenceDataset, max_length: int | None, mask_prompt: bool) -> list[int]:
    """The indices of the pairs whose chosen and rejected answers both keep a scored token after
    truncation to `max_length`: a pair with none has no log-probability (the notebook's NaN), and one
    NaN would stop training. The caller says how many it leaves out."""
    return [
        i
        for i, item in enumerate(dataset.encoded_texts)
        if all(response_tokens(item, key, max_length, mask_prompt) for key in PAIR)
    ]


def response_moves(entries: Sequence[Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """How the answers moved: the mean ROUGE-L F1 of the reference's answers (`reference_response`,
    "before") and of the tuned model's (`policy_response`, "after") against each entry's `chosen` and
    `rejected` answers. Tuning toward the chosen style raises the first against the second."""
    from llm.instruct import rouge_l

    n = len(entries)
    out = {}
    for side, key in (("before", "reference_response"), ("after", "policy_response")):
        out[side] = {
            f"rouge_l_{answer}": sum(rouge_l(e[key], e[answer]) for e in entries) / n if n else float("nan")
            for answer in PAIR
        }
    return out
