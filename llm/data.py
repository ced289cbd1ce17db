"""Token data (chapter 2): token ids stored once as a flat uint16 file, windows built on access.

The book's `GPTDatasetV1` materialises one input and one target tensor per window, so memory
grows with the number of windows (stride 1 over a 1M-token corpus: two million tensors). Here the
dataset holds only the id array (usually an `np.memmap`) and slices a window in `__getitem__`,
with exactly the book's windows: starts `range(0, len(ids) - max_length, stride)`, input
`ids[i:i+max_length]`, target `ids[i+1:i+max_length+1]`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llm.errors import LLMError
from llm.files import atomic_path
from llm.tokenizer import check_token_ids, encode, get_tokenizer

TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit; half the bytes of int32


def write_tokens(path: str | os.PathLike, chunks: Iterable[Iterable[int] | np.ndarray]) -> int:
    """Write token ids to a flat uint16 file atomically (temp file, then rename); return the count."""
    path = Path(path)
    n = 0
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        for chunk in chunks:
            arr = np.asarray(chunk, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(TOKEN_DTYPE).max):
                raise LLMError(f"token id out of uint16 range while writing {path}")
            arr.astype(TOKEN_DTYPE).tofile(f)
            n += arr.size
    return n


def read_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a token file written by `write_tokens` (read-only; nothing is loaded up front).

    With `vocab_size` (the model's), the file is read once to check that every id is below it
    (`llm.tokenizer.check_token_ids`): an error naming the file, instead of a failure inside the model.
    """
    path = Path(path)
    if not path.is_file():
        raise LLMError(f"token file {path} does not exist: the prepare_text stage writes it")
    if path.stat().st_size % np.dtype(TOKEN_DTYPE).itemsize:
        raise LLMError(f"token file {path} is truncated: its size is not a multiple of 2 bytes")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    ids = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if vocab_size is not None:
        check_token_ids(ids, vocab_size, f"token file {path}")
    return ids


class TokenWindowDataset(Dataset):
    """Sliding windows over a 1-D array of token ids, built on access (the book's semantics)."""

    def __init__(self, token_ids: np.ndarray, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise LLMError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        self.ids = token_ids
        self.max_length = max_length
        self.stride = stride
        # len(range(0, n - L, stride)) without building it
        self._len = max(0, -(-(len(token_ids) - max_length) // stride))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if idx < 0:
            idx += self._len
        if not 0 <= idx < self._len:
            raise IndexError(f"window {idx} out of range for {self._len} windows")
        start = idx * self.stride
        chunk = torch.from_numpy(self.ids[start : start + self.max_length + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def min_split_tokens(max_length: int) -> int:
    """The fewest tokens that hold one window: `max_length` inputs and the target one further."""
    return max_length + 1


def split_windows(
    tokens_dir: str | os.PathLike, max_length: int, stride: int, vocab_size: int | None = None
) -> tuple[TokenWindowDataset, TokenWindowDataset]:
    """The train and val windows of the token files the prepare_text stage wrote in `tokens_dir`.

    A split too small for one window is one line naming its size and the settings that decide it,
    never an empty dataset that trains on nothing or evaluates to NaN. With `vocab_size`, so is an
    id the model cannot embed (`read_tokens`).
    """
    sets = []
    for split in ("train", "val"):
        path = Path(tokens_dir) / f"{split}.bin"
        ds = TokenWindowDataset(read_tokens(path, vocab_size), max_length, stride)
        if len(ds) == 0:
            raise LLMError(
                f"{path} holds {len(ds.ids):,} tokens, too few for one window of train.max_length + 1 = "
                f"{min_split_tokens(max_length)} tokens; data.corpus, data.train_ratio and train.max_length "
                "decide the splits: change them and run prepare_text again"
            )
        sets.append(ds)
    return sets[0], sets[1]


class GPTDatasetV1(TokenWindowDataset):
    """The book's `GPTDatasetV1(txt, tokenizer, max_length, stride)`, without one tensor per window."""

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int):
        ids = np.asarray(encode(txt, tokenizer), dtype=TOKEN_DTYPE)
        super().__init__(ids, max_length, stride)


def create_dataloader_v1(
    txt: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """The book's `create_dataloader_v1`; pass `generator` for a reproducible shuffle."""
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )
