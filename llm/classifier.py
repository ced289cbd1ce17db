"""Spam classification (chapter 6): the book's data preparation, dataset, head swap and metrics.

`create_balanced_dataset`, `random_split`, `SpamDataset`, `calc_accuracy_loader` and the
`[:, -1, :]` pooling keep the book's semantics; `pooling="last_nonpad"` reads the last real token
instead, since right padding otherwise makes the "last token" a pad for every short message, and
`pooling="mean"` averages over the real tokens.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from llm.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _read_config,
    _read_weights,
    load_weights,
    read_meta,
    save_checkpoint,
)
from llm.errors import CheckpointError, LLMError
from llm.model import GPTModel
from llm.runtime import autocast
from llm.tokenizer import EOT_ID

LABELS = {"ham": 0, "spam": 1}
CLASS_NAMES = ["not spam", "spam"]
POOLINGS = ("last", "last_nonpad", "mean")


def load_sms_spam(path: str | os.PathLike) -> pd.DataFrame:
    """The UCI file: `label<TAB>text` per line, no header, no quoting (texts hold stray quotes)."""
    path = Path(path)
    try:
        df = pd.read_csv(
            path, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE, dtype=str,
            keep_default_na=False,
        )  # fmt: skip
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise LLMError(f"cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    if df.empty:
        raise LLMError(f"{path} holds no messages")
    bad = ~df["Label"].isin(LABELS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise LLMError(f"{path} line {row + 1}: label {df['Label'].iloc[row]!r} is not ham or spam")
    return df


def create_balanced_dataset(df: pd.DataFrame, random_state: int = 123) -> pd.DataFrame:
    """The book's undersampling: as many ham messages as there are spam, drawn with the seed."""
    num_spam = int((df["Label"] == "spam").sum())
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=random_state)
    return pd.concat([ham_subset, df[df["Label"] == "spam"]])


def random_split(df: pd.DataFrame, train_frac: float, validation_frac: float, random_state: int = 123):
    """The book's split: shuffle with the seed, then the first 70% / next 10% / rest."""
    df = df.sample(frac=1, random_state=random_state).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def read_split_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A split written by the stage (or a user's CSV) with `Label` (0/1) and `Text` columns."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"Text": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise LLMError(f"cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
    missing = [c for c in ("Label", "Text") if c not in df.columns]
    if missing:
        raise LLMError(f"{path} has no {missing[0]!r} column (columns: {', '.join(map(str, df.columns))})")
    if not df["Label"].isin([0, 1]).all():
        raise LLMError(f"{path}: column 'Label' must hold 0 (ham) or 1 (spam)")
    return df


def encode_texts(texts: Sequence[str], tokenizer) -> list[list[int]]:
    # disallowed_special=(): an SMS that happens to contain "<|endoftext|>" is plain text
    return tokenizer.encode_batch(list(texts), disallowed_special=())


class SpamDataset(Dataset):
    """The book's SpamDataset: pad with 50256 to `max_length` (default: the longest text), truncating."""

    def __init__(self, df: pd.DataFrame, tokenizer, max_length: int | None = None, pad_token_id: int = EOT_ID):
        self.labels = df["Label"].to_numpy(dtype=np.int64)
        encoded = encode_texts(df["Text"].tolist(), tokenizer)
        if max_length is None:
            self.max_length = max((len(t) for t in encoded), default=1)
        else:
            self.max_length = max_length
            encoded = [t[:max_length] for t in encoded]
        self.tokens = torch.full((len(encoded), self.max_length), pad_token_id, dtype=torch.long)
        for i, ids in enumerate(encoded):
            self.tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx):
        return self.tokens[idx], torch.tensor(self.labels[idx])


def add_classification_head(model: GPTModel, num_classes: int = 2, trainable_blocks: int = 1) -> GPTModel:
    """The book's head swap: freeze everything, then train the new head, `final_norm` and the
    last `trainable_blocks` transformer blocks (the book: 1; -1 = all, 0 = head and norm only)."""
    for p in model.parameters():
        p.requires_grad = False
    model.out_head = nn.Linear(model.cfg["emb_dim"], num_classes).to(model.tok_emb.weight.device)
    n_blocks = len(model.trf_blocks)
    k = n_blocks if trainable_blocks < 0 else min(trainable_blocks, n_blocks)
    for block in list(model.trf_blocks)[n_blocks - k :]:
        for p in block.parameters():
            p.requires_grad = True
    if k == n_blocks:  # the whole network trains, embeddings included
        for p in model.parameters():
            p.requires_grad = True
    for p in model.final_norm.parameters():
        p.requires_grad = True
    return model


def class_logits(model, input_batch: torch.Tensor, pooling: str = "last", pad_token_id: int = EOT_ID):
    """Logits (B, num_classes) at the last position (the book), at the last non-pad token, or
    averaged over the non-pad tokens (the head is linear: the same as classifying the mean state)."""
    logits = model(input_batch)
    if pooling == "last":
        return logits[:, -1, :]
    real = input_batch != pad_token_id
    lengths = real.sum(dim=1).clamp(min=1)
    if pooling == "mean":
        return (logits * real.unsqueeze(-1)).sum(dim=1) / lengths.unsqueeze(-1)
    return logits[torch.arange(len(input_batch), device=logits.device), lengths - 1]


def classification_loss(pooling: str = "last"):
    """A loss_fn for `llm.trainer.Trainer`: cross-entropy of the pooled logits."""

    def loss_fn(model, batch, device, precision):
        inputs, labels = batch[0].to(device), batch[1].to(device)
        with autocast(device, precision):
            logits = class_logits(model, inputs, pooling)
        return F.cross_entropy(logits.float(), labels)

    return loss_fn


@torch.no_grad()
def predict(model, loader, device, pooling: str = "last", num_batches: int | None = None):
    """(labels, predicted labels, spam probabilities, mean loss) over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    labels, preds, probs, losses = [], [], [], []
    for i, (inputs, target) in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        logits = class_logits(model, inputs.to(device), pooling).float()
        target = target.to(device)
        losses.append(F.cross_entropy(logits, target, reduction="sum").item())
        labels.append(target.cpu())
        preds.append(logits.argmax(-1).cpu())
        probs.append(torch.softmax(logits, -1)[:, 1].cpu())
    model.train(was_training)
    if not labels:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0), float("nan")
    y = torch.cat(labels).numpy()
    return y, torch.cat(preds).numpy(), torch.cat(probs).numpy(), sum(losses) / len(y)


def calc_accuracy_loader(data_loader, model, device, num_batches=None, pooling: str = "last") -> float:
    """The book's accuracy: share of correct argmax predictions over the first `num_batches`."""
    y, pred, _, _ = predict(model, data_loader, device, pooling, num_batches)
    return float((y == pred).mean()) if len(y) else float("nan")


def binary_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, spam precision/recall/F1 and the confusion matrix (rows: true, cols: predicted)."""
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(y) if len(y) else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def save_classifier(model: GPTModel, path, max_length: int, pooling: str, extra: dict | None = None) -> Path:
    info = {"num_classes": model.out_head.out_features, "max_length": max_length, "pooling": pooling}
    return save_checkpoint(model, path, extra={"classifier": info, **(extra or {})})


def load_classifier(path, map_location="cpu") -> tuple[GPTModel, dict]:
    """A classifier checkpoint written by `save_classifier` → (model in eval mode, its settings)."""
    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"classifier checkpoint {path} has no {WEIGHTS_NAME} (expected a directory)")
    meta = read_meta(path / CONFIG_NAME)
    if "classifier" not in meta:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a classifier config: no 'classifier' settings")
    info = meta["classifier"]
    model = GPTModel(_read_config(path / CONFIG_NAME))
    model.out_head = nn.Linear(model.cfg["emb_dim"], info["num_classes"])
    load_weights(model, _read_weights(path / WEIGHTS_NAME), path / WEIGHTS_NAME)
    return model.to(map_location).eval(), info
