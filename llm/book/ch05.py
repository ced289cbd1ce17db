"""Chapter 5, pretraining on unlabeled data: the loss helpers, text generation and the training
loop, with the book's names, signatures and return values.

The loss helpers, `generate` and the text helpers are the engine's. `train_model_simple` runs the
engine's loop (`llm.trainer.Trainer`) on the DataLoaders and optimizer it is given, so it draws the
same data order and dropout masks from torch's global RNG as the book's loop and returns the
same lists; `precision` and `progress` are the engine's additions.
"""

from __future__ import annotations

import torch

from llm.generate import generate
from llm.loaders import Loaders
from llm.losses import calc_loss_batch, calc_loss_loader
from llm.settings import LoopSettings
from llm.tokenizer import text_to_token_ids, token_ids_to_text
from llm.trainer import Trainer, lm_loss

__all__ = [
    "text_to_token_ids",
    "token_ids_to_text",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "generate_and_print_sample",
    "train_model_simple",
    "generate",
]


def evaluate_model(model, train_loader, val_loader, device, eval_iter, precision: str = "fp32"):
    """(train loss, val loss) on the first `eval_iter` batches of each loader, in eval mode."""
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, eval_iter, precision)
    val_loss = calc_loss_loader(val_loader, model, device, eval_iter, precision)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context, max_new_tokens: int = 50):
    """Print a greedy continuation of `start_context` on one line (newlines as spaces)."""
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens, context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))


def book_loop_settings(optimizer, device, num_epochs, eval_freq, eval_iter, precision="fp32") -> LoopSettings:
    """The loop settings of the book's functions: its arguments, constant lr, nothing else on."""
    return LoopSettings(
        num_epochs=num_epochs,
        eval_freq=eval_freq,
        eval_iter=eval_iter,
        lr=optimizer.param_groups[0]["lr"],
        weight_decay=optimizer.param_groups[0].get("weight_decay", 0.0),
        precision=precision,
        device=str(torch.device(device)),
    )


def train_model_simple(
    model,
    train_loader,
    val_loader,
    optimizer,
    device,
    num_epochs,
    eval_freq,
    eval_iter,
    start_context,
    tokenizer,
    *,
    precision: str = "fp32",
    progress: bool = True,
):
    """The book's loop: returns (train_losses, val_losses, track_tokens_seen).

    Every `eval_freq` optimizer steps (from the first) it prints `Ep 1 (Step 000000): Train loss
    ..., Val loss ...` for the first `eval_iter` batches of each loader, and after each epoch a
    greedy sample of 50 tokens after `start_context`.
    """
    if num_epochs <= 0:
        return [], [], []
    trainer = Trainer(
        model,
        Loaders.given(train_loader, val_loader),
        book_loop_settings(optimizer, device, num_epochs, eval_freq, eval_iter, precision),
        loss_fn=lm_loss,
        on_epoch_end=lambda m, epoch: generate_and_print_sample(m, tokenizer, device, start_context),
        progress=progress,
        optimizer=optimizer,
    )
    history = trainer.fit()
    return history.train_loss, history.val_loss, history.tokens_seen
