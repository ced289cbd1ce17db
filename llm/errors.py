"""One exception type for every problem a user can fix: the CLI prints it as one line."""


class LLMError(Exception):
    """Bad input, config, file or environment. The message names what is wrong and what is allowed."""


class ConfigError(LLMError, ValueError):
    """A model or training setting is missing, unknown or out of range."""


class CheckpointError(LLMError):
    """A checkpoint file is missing, truncated or does not match the model."""


class TokenizerError(LLMError):
    """The tokenizer cannot be loaded, or text cannot be encoded."""


def run_main(name: str, main, *args, **kwargs) -> None:
    """Run a script's `main`, turning an LLMError into one line on stderr and exit status 2."""
    import sys

    try:
        main(*args, **kwargs)
    except LLMError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(130 if type(exc).__name__ == "TrainingInterrupted" else 2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
