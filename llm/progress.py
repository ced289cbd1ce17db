"""Progress bars on a terminal only: elsewhere (CI, `dvc queue logs`) output is plain lines.

A bar draws on stderr when stderr is a TTY and `TQDM_DISABLE` is not set; otherwise it writes
nothing. `tqdm.std` rather than `tqdm.auto`: the latter calls `iter()` on a wrapped iterable in
its constructor, which for a shuffling DataLoader draws from torch's global RNG a second time.
"""

from __future__ import annotations

import os
import sys

from tqdm.std import tqdm as Bar


def shown() -> bool:
    """Whether a bar may draw now: stderr is a TTY and TQDM_DISABLE is unset or empty."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("TQDM_DISABLE")


def progress_bar(iterable=None, *args, disable: bool = False, **kwargs) -> Bar:
    """`tqdm(iterable, ...)`, disabled unless `shown()`; `disable=True` still turns it off."""
    return Bar(iterable, *args, disable=disable or not shown(), **kwargs)


def write(msg: str) -> None:
    """Print a log line on stdout without breaking a bar that is drawing."""
    Bar.write(msg)
