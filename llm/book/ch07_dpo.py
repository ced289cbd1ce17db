"""Chapter 7's bonus, preference tuning with DPO: the notebook's names, signatures and return values
(`ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb` in the book's repository).

`PreferenceDataset`, the log-probabilities and the loss are the engine's (`llm.dpo`);
`custom_collate_fn` is the notebook's collate for preference pairs, not chapter 7's
(`llm.book.ch07.custom_collate_fn`, which `from llm.book import custom_collate_fn` gives).
`train_model_dpo_simple` is the notebook's loop run by the pipeline's one loop (`llm.trainer.Trainer`):
it draws the same data order and dropout masks from torch's global RNG as the notebook's and returns
the same `tracking` dict. One difference:
`compute_dpo_loss_loader` on an empty loader returns three NaNs where the notebook returns one
(which its `evaluate_dpo_loss_loader` cannot unpack).
"""

from __future__ import annotations

import torch

from llm.book.ch05 import book_loop_settings, generate_and_print_sample
from llm.dpo import (
    DPOLoss,
    PreferenceDataset,
    collate_preferences,
    count_pairs,
    dpo_loss,
    pair_logprobs,
    sequence_logprobs,
)
from llm.loaders import Loaders
from llm.tokenizer import EOT_ID
from llm.trainer import Trainer

__all__ = [
    "PreferenceDataset",
    "custom_collate_fn",
    "compute_dpo_loss",
    "compute_logprobs",
    "compute_dpo_loss_batch",
    "compute_dpo_loss_loader",
    "evaluate_dpo_loss_loader",
    "train_model_dpo_simple",
]


def custom_collate_fn(batch, pad_token_id=EOT_ID, allowed_max_length=None, mask_prompt_tokens=True, device="cpu"):
    """A dict with `prompt` (a list of each item's prompt ids), `chosen` and `rejected` (padded to one
    length), and `chosen_mask` and `rejected_mask` (which tokens count in the loss): see
    `llm.dpo.collate_preferences`."""
    return collate_preferences(batch, pad_token_id, allowed_max_length, mask_prompt_tokens, device)


def compute_dpo_loss(
    model_chosen_logprobs,
    model_rejected_logprobs,
    reference_chosen_logprobs,
    reference_rejected_logprobs,
    beta=0.1,
):
    """(loss, chosen_rewards, rejected_rewards), each averaged over the batch: see `llm.dpo.dpo_loss`."""
    terms = dpo_loss(
        model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs, reference_rejected_logprobs, beta
    )
    return terms.losses.mean(), terms.chosen_rewards.mean(), terms.rejected_rewards.mean()


def compute_logprobs(logits, labels, selection_mask=None):
    """Each row's mean log-probability of its tokens after the first (over the selected ones, given
    a mask), shape (batch_size,): see `llm.dpo.sequence_logprobs`."""
    return sequence_logprobs(logits, labels, selection_mask)


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta):
    """The DPO loss and mean rewards of one collated batch; the reference runs without gradients."""
    policy_chosen, policy_rejected = pair_logprobs(policy_model, batch)
    with torch.no_grad():
        reference_chosen, reference_rejected = pair_logprobs(reference_model, batch)
    return compute_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta)


def compute_dpo_loss_loader(data_loader, policy_model, reference_model, beta, num_batches=None):
    """(loss, chosen reward, rejected reward), each the mean over the first `num_batches` batches
    (all by default) of the batches' means; three NaNs for an empty loader."""
    if len(data_loader) == 0:
        return float("nan"), float("nan"), float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss, total_chosen, total_rejected = 0.0, 0.0, 0.0
    for i, batch in enumerate(data_loader):
        if i >= num_batches:
            break
        loss, chosen_rewards, rejected_rewards = compute_dpo_loss_batch(batch, policy_model, reference_model, beta)
        total_loss += loss.item()
        total_chosen += chosen_rewards.item()
        total_rejected += rejected_rewards.item()
    return total_loss / num_batches, total_chosen / num_batches, total_rejected / num_batches


def evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader, beta, eval_iter):
    """The loss and rewards on the first `eval_iter` batches of each loader, in eval mode, as a dict
    (`train_loss`, `train_chosen_reward`, `train_rejected_reward`, `val_loss`, ...); the policy is
    left in training mode."""
    policy_model.eval()
    res = {}
    with torch.no_grad():
        for split, loader in (("train", train_loader), ("val", val_loader)):
            loss, chosen, rejected = compute_dpo_loss_loader(loader, policy_model, reference_model, beta, eval_iter)
            res.update({f"{split}_loss": loss, f"{split}_chosen_reward": chosen, f"{split}_rejected_reward": rejected})
    policy_model.train()
    return res


def train_model_dpo_simple(
    policy_model,
    reference_model,
    train_loader,
    val_loader,
    optimizer,
    num_epochs,
    beta,
    eval_freq,
    eval_iter,
    start_context,
    tokenizer,
    *,
    progress: bool = True,
):
    """The notebook's loop on the pipeline's one training loop (`llm.trainer.Trainer`, with
    `llm.dpo.DPOLoss`): returns `tracking`, the lists `train_losses`, `train_chosen_rewards`,
    `train_rejected_rewards`, `val_losses`, `val_chosen_rewards`, `val_rejected_rewards` and
    `tokens_seen`, one entry per evaluation.

    Every `eval_freq` optimizer steps (from the first) it evaluates the loss and rewards on the first
    `eval_iter` batches of each loader (`evaluate_dpo_loss_loader`'s numbers) and prints `Ep 1 (Step
    000000): Train loss ..., Val loss ..., Train reward margins ..., Val reward margins ...`; after each
    epoch it prints a greedy sample of 50 tokens after `start_context` from the policy. The reference
    runs on every batch, as in the notebook (the pipeline's stage computes it once per example instead).
    """
    if num_epochs <= 0:
        return {key: [] for key in TRACKING}
    device = next(policy_model.parameters()).device

    def print_evaluation(history):
        extra = history.extra
        train_margin = extra["train_chosen_reward"][-1] - extra["train_rejected_reward"][-1]
        val_margin = extra["val_chosen_reward"][-1] - extra["val_rejected_reward"][-1]
        print(
            f"Ep {history.epoch[-1]} (Step {history.step[-1]:06d}): "
            f"Train loss {history.train_loss[-1]:.3f}, Val loss {history.val_loss[-1]:.3f}, "
            f"Train reward margins {train_margin:.3f}, "
            f"Val reward margins {val_margin:.3f}"
        )

    trainer = Trainer(
        policy_model,
        Loaders.given(train_loader, val_loader),
        book_loop_settings(optimizer, device, num_epochs, eval_freq, eval_iter),
        loss_fn=DPOLoss(beta, reference=reference_model),
        count_fn=count_pairs,
        # the notebook samples its global `model`, which is the policy
        on_epoch_end=lambda m, epoch: generate_and_print_sample(m, tokenizer, device, start_context),
        on_record=print_evaluation,
        progress=progress,
        log=lambda message: None,  # the notebook's line above, with the reward margins
        optimizer=optimizer,
    )
    return tracking(trainer.fit())


def tracking(history) -> dict[str, list]:
    """The notebook's `tracking` dict from a Trainer's History of a DPO run (`llm.dpo.DPOLoss`)."""
    extra = history.extra
    return {
        "train_losses": history.train_loss,
        "train_chosen_rewards": extra["train_chosen_reward"],
        "train_rejected_rewards": extra["train_rejected_reward"],
        "val_losses": history.val_loss,
        "val_chosen_rewards": extra["val_chosen_reward"],
        "val_rejected_rewards": extra["val_rejected_reward"],
        "tokens_seen": history.tokens_seen,
    }


TRACKING = (
    "train_losses",
    "train_chosen_rewards",
    "train_rejected_rewards",
    "val_losses",
    "val_chosen_rewards",
    "val_rejected_rewards",
    "tokens_seen",
)
