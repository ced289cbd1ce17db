"""Helpers shared by the bench/ scripts: machine facts, Markdown tables, the mirrored tokenizer."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch

from llm.pipeline import doc

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "mirror"

T = TypeVar("T")


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
    """The project's Markdown table (`llm.pipeline.doc`), the first `left` columns left-aligned."""
    return doc.markdown_table(header, rows, right=[i >= left for i in range(len(header))])


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
