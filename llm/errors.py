"""One exception type for every problem a user can fix: the CLI prints it as one line."""


class LLMError(Exception):
    """Bad input, config, file or environment. The message names what is wrong and what is allowed."""


class ConfigError(LLMError, ValueError):
    """A model or training setting is missing, unknown or out of range."""


class CheckpointError(LLMError):
    """A checkpoint file is missing, truncated or does not match the model."""


class TokenizerError(LLMError):
    """The tokenizer cannot be loaded, or text cannot be encoded."""


def run_main(
    name: str,
    main,
    *args,
    doc: str | None = None,
    argv: list[str] | None = None,
    positional: tuple[str, str] | None = None,
    **kwargs,
) -> None:
    """Run a script's `main`, turning an LLMError into one line on stderr and exit status 2.

    The command line (`argv`, default `sys.argv[1:]`) takes `--help`, which prints `doc` and exits
    0, and, when `positional` is `(name, help)`, one argument passed to `main` first; anything else
    is one line on stderr and exit status 2, before `main` runs.
    """
    import argparse
    import sys

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"{name}: error: {message}", file=sys.stderr)
            sys.exit(2)

    parser = Parser(prog=name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if positional:
        parser.add_argument(positional[0], help=positional[1])
    parsed = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if positional:
        args = (getattr(parsed, positional[0]), *args)
    try:
        main(*args, **kwargs)
    except LLMError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(130 if type(exc).__name__ == "TrainingInterrupted" else 2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
