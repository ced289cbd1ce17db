"""Progress bars on a terminal only: elsewhere (CI, `dvc queue logs`) output is plain lines.

A bar draws on stderr when stderr is a TTY and `TQDM_DISABLE` is not set; otherwise it writes
nothing, except for the loops a log should show are alive (`lines=True`: a stage answering its test
set one entry at a time for minutes), which print a plain line at every tenth of the way.
`tqdm.std` rather than `tqdm.auto`: the latter calls `iter()` on a wrapped iterable in its
constructor, which for a shuffling DataLoader draws from torch's global RNG a second time.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.std import tqdm as Bar


def shown() -> bool:
    """Whether a bar may draw now: stderr is a TTY and TQDM_DISABLE is unset or empty."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("TQDM_DISABLE")


def progress_bar(iterable=None, *args, disable: bool = False, lines: bool = False, **kwargs):
    """`tqdm(iterable, ...)`, disabled unless `shown()`; `disable=True` still turns it off.
    `lines=True`, off a terminal: the sized `iterable` wrapped by `plain_lines` instead."""
    if lines and not disable and not shown() and not os.environ.get("TQDM_DISABLE"):
        return plain_lines(iterable, kwargs.get("desc", ""), kwargs.get("unit", "it"))
    return Bar(iterable, *args, disable=disable or not shown(), **kwargs)


def plain_lines(items, desc: str, unit: str = "it"):
    """Yield `items` (a sized iterable), printing `desc: 11/110 entries (10%), 42 s, about 6 min left`
    after each tenth of them and after the last: a log off a terminal sees the loop move."""
    total, started, shown_tenths = len(items), time.monotonic(), 0
    units = unit[:-1] + "ies" if unit.endswith("y") else unit + "s"
    for done, item in enumerate(items, 1):
        yield item
        tenths = done * 10 // total
        if tenths > shown_tenths:
            shown_tenths = tenths
            elapsed = time.monotonic() - started
            left = "" if done == total else f", about {_duration(elapsed * (total - done) / done)} left"
            write(f"{desc}: {done}/{total} {units} ({done / total:.0%}), {_duration(elapsed)}{left}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def write(msg: str) -> None:
    """Print a log line on stdout without breaking a bar that is drawing."""
    Bar.write(msg)
