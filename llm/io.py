"""Atomic file writes: a reader (or DVC) never sees a half-written output."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read once: os.umask can only be read by setting it
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed onto `path` when the block succeeds.

    The temporary gets the permissions a plain `open` would give (mkstemp's are 0600), and is
    removed if the block fails, so `path` is always absent, the old file, or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after writing: some writers (safetensors) recreate the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def finite_or_none(x: Any) -> Any:
    """`x`, with a numpy or torch scalar as a Python number; None for NaN, inf and -inf."""
    if getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x


def sanitize(obj: Any) -> Any:
    """`obj` with every non-finite float, in nested dicts, lists and tuples too, replaced by None."""
    if isinstance(obj, dict):
        return {key: sanitize(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(value) for value in obj]
    return finite_or_none(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented UTF-8 JSON; NaN and infinities become null, so the file is strict JSON."""
    text = json.dumps(sanitize(obj), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    rows = list(rows)
    buf = io.StringIO()
    fields = list(rows[0]) if rows else []
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode())
