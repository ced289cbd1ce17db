"""Helpers shared by the bench/ scripts: the book's reference code, machine facts, Markdown tables."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "mirror"

T = TypeVar("T")


def load_book_reference() -> ModuleType:
    """`tests/book_reference.py` (the book's verbatim code), loaded by path: tests/ is no package."""
    path = ROOT / "tests" / "book_reference.py"
    spec = importlib.util.spec_from_file_location("book_reference", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load the book's reference code from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["book_reference"] = module
    spec.loader.exec_module(module)
    return module


def use_mirrored_tiktoken() -> None:
    """Point tiktoken at the mirrored gpt2 files unless the caller already chose a cache dir."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and (MIRROR / "tiktoken").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(MIRROR / "tiktoken")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(threads: int) -> list[str]:
    import transformers

    return [
        f"- CPU: {cpu_name()}, os.cpu_count() = {os.cpu_count()}, torch threads = {threads}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
    ]


def markdown_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A GitHub Markdown table; the first `left` columns are left-aligned, the rest right-aligned."""
    right = [i >= left for i in range(len(header))]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if r else "---" for r in right) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """`items` starting at index `shift` (mod its length) and wrapping around.

    The interleaved benchmarks run one round of every implementation at a time and rotate the
    starting one each round, so that no implementation always runs first (or right after the
    same neighbour) and slow drifts of the machine's speed hit every implementation alike.
    """
    k = shift % len(items) if items else 0
    return [*items[k:], *items[:k]]


def write_report(path: str | os.PathLike, text: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"\nwrote {out}", file=sys.stderr)
