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
