"""One exception type for every problem a user can fix, and the one place that turns it into a
line on stderr and an exit status (`report_error`), for the `llm` command and the stage scripts."""

import sys

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


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


def exit_code(exc: BaseException) -> int:
    """The exit status for an error that ends a command: an LLMError's `exit_code`, 130 for
    Ctrl-C, and 1 for anything else (a bug: Python's own status for an uncaught exception)."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, LLMError):
        return exc.exit_code
    return 1


def report_error(prog: str, exc: LLMError | KeyboardInterrupt) -> int:
    """Print `exc` as one line on stderr (`PROG: error: MESSAGE`, or `PROG: interrupted` for Ctrl-C)
    and return its exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
    else:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    return exit_code(exc)


def run_main(
    name: str,
    main,
    *args,
    doc: str | None = None,
    argv: list[str] | None = None,
    positional: tuple[str, str] | None = None,
    **kwargs,
) -> None:
    """Run a script's `main`, turning an LLMError or Ctrl-C into one line on stderr and its exit
    status (`report_error`).

    The command line (`argv`, default `sys.argv[1:]`) takes `--help`, which prints `doc` and exits
    0, and, when `positional` is `(name, help)`, one argument passed to `main` first; anything else
    is one line on stderr and exit status 2, before `main` runs.
    """
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            sys.exit(report_error(name, LLMError(message)))

    parser = Parser(prog=name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if positional:
        parser.add_argument(positional[0], help=positional[1])
    parsed = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if positional:
        args = (getattr(parsed, positional[0]), *args)
    try:
        main(*args, **kwargs)
    except (LLMError, KeyboardInterrupt) as exc:
        sys.exit(report_error(name, exc))
