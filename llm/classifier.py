"""Spam classification (chapter 6): the book's data preparation, dataset, head swap and metrics.

`create_balanced_dataset`, `random_split`, `SpamDataset` and the `[:, -1, :]` pooling keep the
book's semantics; `pooling="last_nonpad"` reads the last real token instead, since right padding
otherwise makes the "last token" a pad for every short message, and `pooling="mean"` averages over
the real tokens. `classify` scores new messages with a checkpoint that `save_classifier` wrote.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from llm.checkpoint import ADAPTER_CONFIG, CONFIG_NAME, WEIGHTS_NAME, adapter_dir, read_checkpoint, save_checkpoint
from llm.choices import POOLINGS
from llm.errors import CheckpointError, LLMError, first_line
from llm.model import GPTModel
from llm.pooling import pool
from llm.runtime import autocast, to_device
from llm.tokenizer import EOT_ID, check_token_ids, get_tokenizer

LABELS = {"ham": 0, "spam": 1}
CLASS_NAMES = ["not spam", "spam"]


def load_sms_spam(path: str | os.PathLike) -> pd.DataFrame:
    """The UCI file: `label<TAB>text` per line, no header, no quoting (texts hold stray quotes)."""
    path = Path(path)
    try:
        df = pd.read_csv(
            path, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE, dtype=str,
            keep_default_na=False,
        )  # fmt: skip
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise LLMError(f"cannot read {path}: {first_line(exc)}") from None
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
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise LLMError(f"cannot read {path}: {first_line(exc)}") from None
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
    """The book's SpamDataset: pad with 50256 to `max_length` (default: the longest text), truncating.

    `truncated` counts the texts cut to `max_length` tokens.
    """

    def __init__(self, df: pd.DataFrame, tokenizer, max_length: int | None = None, pad_token_id: int = EOT_ID):
        self.labels = df["Label"].to_numpy(dtype=np.int64)
        encoded = encode_texts(df["Text"].tolist(), tokenizer)
        if max_length is None:
            self.max_length = max((len(t) for t in encoded), default=1)
        else:
            self.max_length = max_length
        self.truncated = sum(len(t) > self.max_length for t in encoded)
        encoded = [t[: self.max_length] for t in encoded]
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
    model.cfg = {**model.cfg, "tie_embeddings": False}  # a tied model's embedding stays; the new head is its own
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
    """Logits (B, num_classes) of a batch, pooled as `pooling` names (`llm.choices.POOLINGS`)."""
    return pool(model(input_batch), input_batch, pooling, pad_token_id)


def classification_loss(pooling: str = "last"):
    """A loss_fn for `llm.trainer.Trainer`: cross-entropy of the pooled logits."""

    def loss_fn(model, batch, device, precision):
        inputs, labels = to_device(batch[0], device), to_device(batch[1], device)
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


def binary_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, spam precision/recall/F1 and the confusion matrix (rows: true, cols: predicted).

    F1 is the harmonic mean of scikit-learn's precision and recall, as the committed metrics were
    computed; scikit-learn's own `f1_score` (2·tp / (2·tp + fp + fn)) can differ in the last bit.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    if len(y) == 0:  # scikit-learn refuses empty input
        return {
            "accuracy": float("nan"),
            "precision": 0.0,
            "recall": 0.0,
            "f1": 0.0,
            "tn": 0,
            "fp": 0,
            "fn": 0,
            "tp": 0,
        }
    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    p, r, _, _ = precision_recall_fscore_support(y, pred, labels=[1], average=None, zero_division=0)
    precision, recall = float(p[0]), float(r[0])
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float(accuracy_score(y, pred)),
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
    if not (path / WEIGHTS_NAME).is_file() and adapter_dir(path) is None:
        raise CheckpointError(f"classifier checkpoint {path} has no {WEIGHTS_NAME} (expected a directory)")
    checkpoint = read_checkpoint(path)
    config = path / CONFIG_NAME if adapter_dir(path) is None else adapter_dir(path) / ADAPTER_CONFIG
    if "classifier" not in checkpoint.meta:
        raise CheckpointError(f"{config} is not a classifier config: no 'classifier' settings")
    info = classifier_settings(checkpoint.meta["classifier"], config, checkpoint.cfg["context_length"])
    return checkpoint.model(map_location, num_classes=info["num_classes"]), info


def classifier_settings(info, file, context_length: int) -> dict:
    """The "classifier" settings of a checkpoint's config.json (`file`, named in errors), checked:
    `num_classes` a whole number >= 2, `max_length` one in [1, context_length], `pooling` a name
    of `llm.choices.POOLINGS`. A missing or unknown value is a CheckpointError, never a guess."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: 'classifier' must be an object with num_classes, max_length and pooling")

    def whole(key: str, low: int, high: int | None = None) -> int:
        if key not in info:
            raise CheckpointError(f"{file}: classifier.{key} is missing (a whole number >= {low})")
        value = info[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            allowed = f"in [{low}, {high}] (the model's context_length)" if high is not None else f">= {low}"
            raise CheckpointError(f"{file}: classifier.{key} must be a whole number {allowed}, got {value!r}")
        return value

    whole("num_classes", 2)
    whole("max_length", 1, context_length)
    names = ", ".join(POOLINGS)
    if "pooling" not in info:
        raise CheckpointError(f"{file}: classifier.pooling is missing (one of {names})")
    if not isinstance(info["pooling"], str) or info["pooling"] not in POOLINGS:
        raise CheckpointError(f"{file}: classifier.pooling must be one of {names}, got {info['pooling']!r}")
    return info


@dataclass(frozen=True)
class Scores:
    """`classify`'s answer: the spam probability of each message, and how many were truncated."""

    spam_probability: list[float]
    truncated: int  # messages longer than the classifier's max_length, cut to it

    @property
    def labels(self) -> list[str]:
        return [CLASS_NAMES[int(p >= 0.5)] for p in self.spam_probability]


BATCH_SIZE = 32
"""Messages per forward pass of `classify` (`llm classify`, and one step of `/v1/classify`)."""


@torch.inference_mode()
def classify(model: GPTModel, info: dict, texts: Sequence[str], batch_size: int = BATCH_SIZE, device=None) -> Scores:
    """Spam probabilities of `texts` with a classifier and its settings (`load_classifier`).

    Messages are padded and truncated to `info["max_length"]` tokens as in training (SpamDataset);
    an empty message is read as a single space. Scores that are not finite (a classifier with NaN or
    infinite weights) are an LLMError naming the message, never a label: NaN >= 0.5 is False, which
    would read as "not spam".
    """
    device = next(model.parameters()).device if device is None else device
    df = pd.DataFrame({"Label": [0] * len(texts), "Text": [t or " " for t in texts]})
    data = SpamDataset(df, get_tokenizer(), max_length=info["max_length"])
    check_token_ids(data.tokens, model.cfg["vocab_size"], "the messages")  # GPT-2 ids, padded with 50256
    was_training = model.training
    model.eval()
    probs: list[float] = []
    for start in range(0, len(data), batch_size):
        batch = data.tokens[start : start + batch_size].to(device)
        logits = class_logits(model, batch, info["pooling"]).float()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        if not all(finite):
            i = start + finite.index(False)
            raise LLMError(
                f"the classifier's scores for message {i + 1} of {len(texts)} are {logits[i - start].tolist()}, "
                "not finite numbers: its weights are damaged (NaN, infinite or overflowing values); nothing was "
                "classified"
            )
        probs += torch.softmax(logits, dim=-1)[:, 1].tolist()
    model.train(was_training)
    return Scores(probs, data.truncated)
