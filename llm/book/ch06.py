"""Chapter 6, finetuning for classification: the spam data, the chapter's last-token loss and
accuracy helpers, its training loop and `classify_review`.

These `calc_loss_batch`, `calc_loss_loader` and `evaluate_model` are chapter 6's: they score the
logits of the last token against a class label, where chapter 5's (`llm.book.ch05`) score every
position against the next token. `train_classifier_simple` runs the engine's loop
(`llm.trainer.Trainer`) with the loaders and optimizer it is given, so it draws the same data
order and dropout masks from torch's global RNG as the book's loop and returns the same values.
The data helpers are the engine's (`llm.classifier`); its `SpamDataset` takes a DataFrame where
the book's reads a CSV path (`SpamDataset(pd.read_csv("train.csv"), tokenizer)`).
"""

from __future__ import annotations

import torch

from llm.book.ch05 import book_loop_settings
from llm.classifier import (
    SpamDataset,
    class_logits,
    classification_loss,
    create_balanced_dataset,
    encode_texts,
    random_split,
)
from llm.loaders import Loaders
from llm.losses import calc_loss_loader as _calc_loss_loader
from llm.tokenizer import EOT_ID
from llm.trainer import Trainer

__all__ = [
    "create_balanced_dataset",
    "random_split",
    "SpamDataset",
    "calc_accuracy_loader",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "train_classifier_simple",
    "classify_review",
]

_last_token_loss = classification_loss("last")


@torch.no_grad()
def calc_accuracy_loader(data_loader, model, device, num_batches=None) -> float:
    """Share of correct argmax predictions of the last token's logits over the first `num_batches`
    batches (all by default). Leaves the model in eval mode, as the book's does."""
    model.eval()
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    correct, total = 0, 0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        logits = class_logits(model, input_batch.to(device), "last")
        correct += (logits.argmax(dim=-1) == target_batch.to(device)).sum().item()
        total += len(target_batch)
    return correct / total if total else float("nan")


def calc_loss_batch(input_batch, target_batch, model, device):
    """Cross-entropy of the last token's logits against the class labels of one batch."""
    return _last_token_loss(model, (input_batch, target_batch), torch.device(device), "fp32")


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Mean last-token classification loss over the first `num_batches` batches; NaN if empty."""
    return _calc_loss_loader(data_loader, model, device, num_batches, loss_fn=_last_token_loss)


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """(train loss, val loss) on the first `eval_iter` batches of each loader, in eval mode."""
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
    val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def train_classifier_simple(
    model,
    train_loader,
    val_loader,
    optimizer,
    device,
    num_epochs,
    eval_freq,
    eval_iter,
    *,
    progress: bool = True,
):
    """The book's loop: returns (train_losses, val_losses, train_accs, val_accs, examples_seen).

    Every `eval_freq` optimizer steps (from the first) it prints the chapter's losses on the first
    `eval_iter` batches of each loader (`Ep 1 (Step 000000): Train loss ..., Val loss ...`); after
    each epoch, the accuracies on the first `eval_iter` batches (`Training accuracy: 97.50% |
    Validation accuracy: 95.00%`). Like the book's, it leaves the model in eval mode.
    """
    train_accs, val_accs = [], []
    if num_epochs <= 0:
        return [], [], train_accs, val_accs, 0

    def epoch_accuracy(model, epoch):
        train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        print(f"Training accuracy: {train_accuracy * 100:.2f}% | Validation accuracy: {val_accuracy * 100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)

    trainer = Trainer(
        model,
        Loaders.given(train_loader, val_loader),
        book_loop_settings(optimizer, device, num_epochs, eval_freq, eval_iter),
        loss_fn=_last_token_loss,
        on_epoch_end=epoch_accuracy,
        progress=progress,
        optimizer=optimizer,
    )
    history = trainer.fit()
    model.eval()  # the book's last calc_accuracy_loader leaves it so
    return history.train_loss, history.val_loss, train_accs, val_accs, history.total_examples


@torch.no_grad()
def classify_review(text, model, tokenizer, device, max_length=None, pad_token_id=EOT_ID) -> str:
    """ "spam" or "not spam" for one text, prepared as `SpamDataset` prepares its texts: tokenized,
    truncated to `max_length` and padded with `pad_token_id` to `max_length`; the class is the
    argmax of the last token's logits. `max_length` is capped at the model's context length, and
    None means that length (the book's requires a number). Leaves the model in eval mode."""
    model.eval()
    context_length = model.pos_emb.weight.shape[0]
    max_length = context_length if max_length is None else min(max_length, context_length)
    input_ids = encode_texts([text], tokenizer)[0][:max_length]
    input_ids += [pad_token_id] * (max_length - len(input_ids))
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)
    predicted_label = class_logits(model, input_tensor, "last").argmax(dim=-1).item()
    return "spam" if predicted_label == 1 else "not spam"
