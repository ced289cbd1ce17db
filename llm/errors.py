"""One exception type for every problem a user can fix, and the one place that turns an error
ending a command into one line on stderr and an exit status (`report_error`), for the `llm`
command and the stage scripts (`run_main`, `OneLineParser`). Reading and writing files and
standard output is `llm.files`'s.

Exit statuses (`exit_code`):

- 2: bad input, config, file or environment: an `LLMError` (subclasses may set their own), an
  `OSError` nobody caught earlier (disk full, read-only file system, permission denied, a
  directory where a file belongs…: the line names the file and the reason), or running out of
  memory;
- 130 (128 + SIGINT): Ctrl-C;
- 141 (128 + SIGPIPE): the reader of standard output went away (`llm generate … | head`); like a
  Unix tool killed by SIGPIPE this prints nothing, and standard output is pointed at /dev/null so
  that Python's own flush at exit does not complain either;
- 1: anything else, a bug, with Python's traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import suppress

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a tool whose reader went away
ENVIRONMENT = 2  # an OSError or MemoryError: the same status as bad input
STDOUT = "<stdout>"  # the name `naming` gives standard output in an OSError


class LLMError(Exception):
    """Bad input, config, file or environment. The message names what is wrong and what is allowed.

    `exit_code` is the process exit status it ends a command with; subclasses may set their own.
    """

    exit_code = 2


class ConfigError(LLMError, ValueError):
    """A model or training setting is missing, unknown or out of range."""


class CheckpointError(LLMError):
    """A checkpoint file is missing, truncated or does not match the model."""


class TokenizerError(LLMError):
    """The tokenizer cannot be loaded, or text cannot be encoded."""


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch's OutOfMemoryError (CUDA, MPS) is a RuntimeError: named here without importing torch
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and type(exc).__name__ == "OutOfMemoryError")


def reportable(exc: BaseException) -> bool:
    """Whether `exc` ends a command with one line (`report_error`) rather than a traceback."""
    return isinstance(exc, (LLMError, KeyboardInterrupt, OSError)) or _is_out_of_memory(exc)


def exit_code(exc: BaseException) -> int:
    """The exit status for an error that ends a command (the module docstring lists them)."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, LLMError):
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):
        return BROKEN_PIPE
    if isinstance(exc, OSError) or _is_out_of_memory(exc):
        return ENVIRONMENT
    return 1


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message (torch, YAML and zip errors span several), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def os_reason(exc: OSError) -> str:
    """The reason of an OSError in words: `os.strerror` of its errno, else its first line."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return first_line(exc)  # a timeout, a URL error…: no errno


def describe_os_error(exc: OSError) -> str:
    """`FILE: reason` for an OSError (`os_reason`), on one line; `SRC -> DST: reason` for a
    rename, just the reason when the error names no file."""
    reason = os_reason(exc)
    names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    if names == [STDOUT]:
        return f"cannot write to standard output: {reason}"
    return f"{' -> '.join(names)}: {reason}" if names else reason


def describe(exc: BaseException) -> str:
    """The one-line message for a reportable error (`reportable`)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError) and not isinstance(exc, LLMError):
        return describe_os_error(exc)
    if _is_out_of_memory(exc):
        lines = str(exc).strip().splitlines()
        first = lines[0].split(". ")[0].rstrip(".") if lines else ""  # torch adds paragraphs of advice
        return f"out of memory{f' ({first})' if first else ''}: try a smaller batch or model"
    return " ".join(str(exc).split("\n"))  # one line, whatever the message


def _stdout_gone(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.filename == STDOUT)


def _point_stdout_at_devnull() -> None:
    """What Python's documentation advises after a broken pipe: standard output to /dev/null, so
    that the interpreter's flush at exit does not fail again (and print its own message)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no stdout, or one without a descriptor (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def report_error(prog: str, exc: BaseException) -> int:
    """Print `exc` as one line on stderr (`PROG: error: MESSAGE`, `PROG: interrupted` for Ctrl-C,
    nothing for a broken pipe on standard output) and return its exit status (`exit_code`)."""
    if _stdout_gone(exc):
        _point_stdout_at_devnull()
    if not isinstance(exc, BrokenPipeError):
        line = f"{prog}: interrupted" if isinstance(exc, KeyboardInterrupt) else f"{prog}: error: {describe(exc)}"
        with suppress(OSError, ValueError):  # stderr itself gone: the exit status is all that is left
            print(line, file=sys.stderr, flush=True)
    return exit_code(exc)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad command line as one line on stderr and exit status 2 (no usage dump):
    the parser of the `llm` command and of every stage script (`run_main`)."""

    def error(self, message):
        sys.exit(report_error(self.prog, LLMError(message)))


def run_main(
    name: str,
    main,
    *args,
    doc: str | None = None,
    argv: list[str] | None = None,
    positional: tuple[str, str] | None = None,
    **kwargs,
) -> None:
    """Run a script's `main`, turning a reportable error (`reportable`: an LLMError, Ctrl-C, an
    OSError, running out of memory) into one line on stderr and its exit status (`report_error`).

    The command line (`argv`, default `sys.argv[1:]`) takes `--help`, which prints `doc` and exits
    0, and, when `positional` is `(name, help)`, one argument passed to `main` first; anything else
    is one line on stderr and exit status 2, before `main` runs.
    """
    from llm.files import flush_stdout  # here: llm.files imports this module

    parser = OneLineParser(prog=name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if positional:
        parser.add_argument(positional[0], help=positional[1])
    parsed = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if positional:
        args = (getattr(parsed, positional[0]), *args)
    try:
        main(*args, **kwargs)
        flush_stdout()
    except BaseException as exc:
        if not reportable(exc):
            raise
        sys.exit(report_error(name, exc))
