"""Pretraining corpus → train/val token files, streamed so a 1 GB corpus runs in bounded memory.

The book reads the whole text, splits it at `int(train_ratio * len(text))` characters and
tokenizes each side. Here the text is read in large chunks, cut only where GPT-2's
pre-tokenizer cannot join the two sides (before a space or after a newline that sits between
two non-space characters), encoded on several threads (tiktoken releases the GIL while it
encodes; at most 2 × threads chunks are held at a time), and appended in order to the uint16
token files: the ids equal the book's whole-text encoding. Every run writes both files, an empty
split as an empty file, and replaces the old pair only once both are complete. A file that is not
UTF-8 is one line naming it and the byte where it breaks.

`expand_corpus` turns a local corpus entry (a file, a directory or a glob pattern) into its files.
The thread count defaults to the CPUs this process may run on; the environment variable
LLM_TOKENIZE_THREADS caps it (a machine shared with other jobs, a container whose CPU quota is
below its CPU affinity). It is not a parameter: it does not change a single id.
"""

from __future__ import annotations

import codecs
import collections
import glob
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
import tiktoken

from llm.data import write_tokens
from llm.errors import LLMError
from llm.files import atomic_path
from llm.progress import Bar, progress_bar
from llm.tokenizer import EOT_TOKEN, get_tokenizer

DOC_SEPARATOR = EOT_TOKEN  # between files, as GPT-2's training data separates documents
CHUNK_CHARS = 4 * 2**20
SPLITS = ("train", "val")
THREADS_ENV = "LLM_TOKENIZE_THREADS"
GLOB_CHARS = "*?["


def tokenize_threads() -> int:
    """Threads `tokenize_corpus` uses by default: the CPUs this process may run on, capped by
    $LLM_TOKENIZE_THREADS when it is set (a whole number >= 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows): every CPU
        n = os.cpu_count() or 1
    cap = os.environ.get(THREADS_ENV, "").strip()
    if cap:
        if not (cap.isascii() and cap.isdigit() and int(cap) >= 1):
            raise LLMError(f"{THREADS_ENV}={cap!r}: must be a whole number >= 1, the most threads tokenization uses")
        n = min(n, int(cap))
    return max(1, n)


def _path_key(path: str | os.PathLike) -> tuple[str, ...]:
    return Path(path).parts  # component by component: a folder's files stay together


def _visible_files(root: Path, what: str) -> list[Path]:
    def fail(exc: OSError):
        raise LLMError(f"cannot read {what} ({exc.filename}): {exc.strerror or exc}")

    found = []
    for folder, dirs, files in os.walk(root, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)):
                found.append(Path(folder, name).relative_to(root))
    return [root / rel for rel in sorted(found, key=_path_key)]


def expand_corpus(entry: str | os.PathLike, what: str | None = None) -> list[Path]:
    """The files a local corpus entry names, in the order they are joined.

    `entry` is a path or a `file:` URL. A file is itself; a directory is every regular file under
    it, at any depth, in sorted relative-path order, skipping hidden files and directories (names
    that start with a dot); a glob pattern (`*`, `?`, `[...]`; `**` for any number of
    directories) is the regular files it matches, sorted, where `*` and `**` skip hidden names as
    the shell does (a pattern that spells the dot, `.cache/*.txt`, matches them). Paths are
    compared component by component (`a/b.txt` before `a-c.txt`). A path that exists is taken as
    it is, even if it holds glob characters. Nothing found is one line naming `what` (default:
    the entry).
    """
    entry = os.fspath(entry)
    what = what or f"corpus entry {entry!r}"
    path = url2pathname(urlsplit(entry).path) if entry.startswith("file:") else entry
    if os.path.isfile(path):
        return [Path(path)]
    if os.path.isdir(path):
        files = _visible_files(Path(path), what)
        if not files:
            raise LLMError(f"{what} is a directory with no files (hidden files and directories are skipped)")
        return files
    if os.path.exists(path):
        raise LLMError(f"{what} is neither a regular file nor a directory")
    if not any(c in path for c in GLOB_CHARS):
        raise LLMError(f"{what}: no such file or directory ({os.path.abspath(path)})")
    files = sorted((m for m in glob.glob(path, recursive=True) if os.path.isfile(m)), key=_path_key)
    if not files:
        hint = "a glob matches regular files; `*` and `**` skip names starting with a dot"
        raise LLMError(f"{what} matches no file ({hint})")
    return [Path(f) for f in files]


def utf8_error(path: str | os.PathLike, chunk_bytes: int = 2**20) -> str | None:
    """Where `path` stops being UTF-8 (`byte b'\\xe9' at offset 17 (line 2)`), or None if it is UTF-8.

    Streamed: a file of any size is read in `chunk_bytes` pieces.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0  # bytes and newlines before the current chunk
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            pending = decoder.getstate()[0]  # an incomplete character carried over from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                data = pending + chunk
                at = offset - len(pending) + exc.start
                line = lines - pending.count(b"\n") + data.count(b"\n", 0, exc.start) + 1
                return f"byte {data[exc.start : exc.start + 1]!r} at offset {at} (line {line})"
            if not chunk:
                return None
            offset += len(chunk)
            lines += chunk.count(b"\n")


def require_utf8(path: str | os.PathLike, what: str) -> None:
    """Stop with one line naming `what` and the file if `path` is not UTF-8 text."""
    try:
        where = utf8_error(path)
    except OSError as exc:
        raise LLMError(f"cannot read {what} ({path}): {exc.strerror or exc}") from None
    if where is not None:
        raise LLMError(f"{what} ({path}) is not UTF-8 text: {where}; save it as UTF-8")


def _read_pieces(paths: list[Path], chunk_chars: int, names: list[str] | None = None) -> Iterator[str]:
    for i, path in enumerate(paths):
        if i:
            yield DOC_SEPARATOR
        try:
            with open(path, encoding="utf-8") as f:  # universal newlines, as the book's open()
                while piece := f.read(chunk_chars):
                    yield piece
        except UnicodeDecodeError:
            what = names[i] if names else "the corpus file"
            require_utf8(path, what)  # names where the file breaks
            raise LLMError(f"{what} ({path}) is not UTF-8 text; save it as UTF-8") from None


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def corpus_size(paths: list[Path], chunk_chars: int = CHUNK_CHARS, names: list[str] | None = None) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of the files joined by DOC_SEPARATOR, as read (universal
    newlines); a file that is not UTF-8 is one line naming it."""
    chars = size = 0
    for piece in _read_pieces(paths, chunk_chars, names):
        chars += len(piece)
        size += _utf8_len(piece)
    return chars, size


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


def text_chunks(paths: list[Path], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The files joined by DOC_SEPARATOR, in pieces of about `chunk_chars` characters cut where
    GPT-2's pre-tokenizer cannot join them: the pieces' encodings, concatenated, equal the
    encoding of the whole text. A piece is longer where the text has no place to cut."""
    return (text for _, text in _split_stream(paths, sys.maxsize, chunk_chars) if text)


_local = threading.local()  # a tokenize thread's own gpt2 encoding
_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None  # kept between calls, with its threads' encodings


def _own_encoding() -> tiktoken.Encoding:
    """This thread's own copy of the gpt2 encoding, built on its first use here.

    tiktoken's regex engine serves the first thread that uses an Encoding on its fast path and
    other threads on a slower shared one, so threads sharing `get_tokenizer()` each encode slower
    than one thread alone. Each copy holds its own tables (the ids are the same).
    """
    enc = getattr(_local, "enc", None)
    if enc is None:
        base = get_tokenizer()
        enc = _local.enc = tiktoken.Encoding(
            name=base.name,
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens=base._special_tokens,
        )
    return enc


def _encode_chunk(text: str) -> np.ndarray:
    return _own_encoding().encode_to_numpy(text, allowed_special={EOT_TOKEN})


def _workers(threads: int) -> ThreadPoolExecutor:
    """A pool of `threads` threads, kept for the next call so that each builds its encoding once.
    A call with another count replaces it; the old pool's threads end when it is collected."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != threads:
            _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="tokenize"))
        return _pool[1]


def _forget_workers() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # a forked child has none of its parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _encode(pieces: Iterable[str], bar: Bar, threads: int) -> Iterator[np.ndarray]:
    """Encode `pieces` on `threads` threads and yield their ids in order, holding at most
    2 × threads pieces (their text and ids) at a time."""
    pool = _workers(threads)
    window: collections.deque[tuple[Future, int]] = collections.deque()
    try:
        for text in pieces:
            if len(window) == 2 * threads:
                yield _collect(window.popleft(), bar)
            window.append((pool.submit(_encode_chunk, text), _utf8_len(text)))
            del text  # only its task holds it now
        while window:
            yield _collect(window.popleft(), bar)
    finally:
        for future, _ in window:  # on an error: drop what has not started
            future.cancel()


def _collect(task: tuple[Future, int], bar: Bar) -> np.ndarray:
    future, size = task
    ids = future.result()
    bar.update(size)
    return ids


def tokenize_corpus(
    paths: list[Path],
    train_ratio: float,
    out_dir: Path,
    chunk_chars: int = CHUNK_CHARS,
    progress: bool = True,
    names: list[str] | None = None,
    check: Callable[[str, dict[str, int]], None] | None = None,
    threads: int | None = None,
) -> dict[str, int]:
    """Write `out_dir/train.bin` and `out_dir/val.bin`; return chars and tokens per split.

    Both files are written on every run, whatever their size (an empty split is an empty file),
    and replace the old ones together only once both are complete: a failure leaves the previous
    pair. `check(split, stats)` runs as soon as a split is tokenized (`stats` holds both splits'
    chars and the tokens so far) and may raise to stop before anything is replaced. `names`
    name the files in errors (a file that is not UTF-8), in the order of `paths`. `threads`
    encode at once (default `tokenize_threads()`); the progress bar counts UTF-8 bytes (MB/s).
    """
    out_dir = Path(out_dir)
    threads = tokenize_threads() if threads is None else threads
    if threads < 1:
        raise LLMError(f"tokenize_corpus: threads must be >= 1, got {threads}")
    total, size = corpus_size(paths, chunk_chars, names)
    split_at = int(train_ratio * total)
    stats = {"train_chars": split_at, "val_chars": total - split_at, "train_tokens": 0, "val_tokens": 0}
    bar_args = {"total": size, "unit": "B", "unit_scale": True, "desc": "tokenize", "disable": not progress}
    with (
        progress_bar(**bar_args) as bar,
        atomic_path(out_dir / "train.bin") as train_tmp,
        atomic_path(out_dir / "val.bin") as val_tmp,
    ):
        tmp = {"train": train_tmp, "val": val_tmp}  # each starts as an empty file
        pending = list(SPLITS)
        for split, group in itertools.groupby(_split_stream(paths, split_at, chunk_chars), key=lambda kv: kv[0]):
            while pending[0] != split:  # a split without any text (the stream yields train, then val)
                _checked(check, pending.pop(0), stats)
            stats[f"{split}_tokens"] = write_tokens(tmp[split], _encode((text for _, text in group), bar, threads))
            _checked(check, pending.pop(0), stats)
        for split in pending:
            _checked(check, split, stats)
    return stats


def _checked(check: Callable[[str, dict[str, int]], None] | None, split: str, stats: dict[str, int]) -> None:
    if check is not None:
        check(split, stats)
