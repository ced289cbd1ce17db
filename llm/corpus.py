"""Pretraining corpus → train/val token files, streamed so a 1 GB corpus runs in bounded memory.

The book reads the whole text, splits it at `int(train_ratio * len(text))` characters and
tokenizes each side. Here the text is read in large chunks, cut only where GPT-2's
pre-tokenizer cannot join the two sides (before a space or after a newline that sits between
two non-space characters), encoded on all cores with `encode_batch`, and appended to the uint16 token files:
the ids equal the book's whole-text encoding.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from llm.data import write_tokens
from llm.errors import LLMError
from llm.progress import Bar, progress_bar
from llm.tokenizer import EOT_TOKEN, get_tokenizer

DOC_SEPARATOR = EOT_TOKEN  # between files, as GPT-2's training data separates documents
CHUNK_CHARS = 4 * 2**20


def _read_pieces(paths: list[Path], chunk_chars: int) -> Iterator[str]:
    for i, path in enumerate(paths):
        if i:
            yield DOC_SEPARATOR
        with open(path, encoding="utf-8") as f:  # universal newlines, as the book's open()
            while piece := f.read(chunk_chars):
                yield piece


def count_chars(paths: list[Path], chunk_chars: int = CHUNK_CHARS) -> int:
    try:
        return sum(len(p) for p in _read_pieces(paths, chunk_chars))
    except UnicodeDecodeError as exc:
        raise LLMError(f"corpus is not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def _safe_cut(text: str) -> int:
    """An index where `text` can be split without changing GPT-2's pre-tokenization; 0 if none.

    Preferred: before a single space between two non-space characters (the space always opens
    the next word's piece, `' ?\\p{L}+'` and its siblings). Else: after a newline between two
    non-space characters (a lone newline is always a piece of its own).
    """
    for sep, shift in ((" ", 0), ("\n", 1)):
        i = len(text) - 1
        while (i := text.rfind(sep, 0, i)) > 0:
            if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
                return i + shift
    return 0


def _split_stream(paths: list[Path], split_at: int, chunk_chars: int) -> Iterator[tuple[str, str]]:
    """Yield ("train"|"val", text) pieces in order; each piece can be encoded on its own."""
    pos, buf = 0, ""
    for piece in _read_pieces(paths, chunk_chars):
        if pos < split_at <= pos + len(piece):  # the book's hard cut between train and val
            head, piece = piece[: split_at - pos], piece[split_at - pos :]
            yield "train", buf + head
            buf, pos = "", split_at
        buf += piece
        pos += len(piece)
        if len(buf) >= chunk_chars:
            cut = _safe_cut(buf)  # text without one safe place (no spaces at all) keeps buffering
            if cut:
                yield ("train" if pos - len(buf) < split_at else "val"), buf[:cut]
                buf = buf[cut:]
    if buf or split_at >= pos:
        yield ("train" if split_at >= pos else "val"), buf


def _encode(pieces: Iterable[str], bar: Bar) -> Iterator[list[int]]:
    tokenizer = get_tokenizer()
    threads = max(1, os.cpu_count() or 1)
    while batch := list(itertools.islice(pieces, threads)):
        for text, ids in zip(
            batch,
            tokenizer.encode_batch(batch, allowed_special={EOT_TOKEN}, num_threads=threads),
            strict=True,
        ):
            bar.update(len(text))
            yield ids


def tokenize_corpus(
    paths: list[Path], train_ratio: float, out_dir: Path, chunk_chars: int = CHUNK_CHARS, progress: bool = True
) -> dict[str, int]:
    """Write `out_dir/train.bin` and `out_dir/val.bin`; return chars and tokens per split."""
    total = count_chars(paths, chunk_chars)
    split_at = int(train_ratio * total)
    stats = {"train_chars": split_at, "val_chars": total - split_at}
    with progress_bar(total=total, unit="char", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        groups = itertools.groupby(_split_stream(paths, split_at, chunk_chars), key=lambda kv: kv[0])
        written = {"train": 0, "val": 0}
        for split, group in groups:
            pieces = (text for _, text in group)
            written[split] += write_tokens(out_dir / f"{split}.bin", _encode(pieces, bar))
    for split in ("train", "val"):
        if not written[split] and not (out_dir / f"{split}.bin").exists():
            write_tokens(out_dir / f"{split}.bin", [])
        stats[f"{split}_tokens"] = written[split]
    return stats
