"""`run_main`: what a stage script does with its command line and with errors."""

import pytest

from llm.errors import ConfigError, run_main
from llm.trainer import TrainingInterrupted

DOC = """Pretrain the book's GPT on the token files.

Reads params.yaml; writes models/pretrain/.
"""


def _run(main, argv, capsys, **kwargs):
    with pytest.raises(SystemExit) as exit_info:
        run_main("pretrain", main, doc=DOC, argv=argv, **kwargs)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _never(*args, **kwargs):
    raise AssertionError("main must not run")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_docstring_and_exits_0(flag, capsys):
    code, out, err = _run(_never, [flag], capsys)
    assert code == 0 and err == ""
    assert "Pretrain the book's GPT on the token files.\n\nReads params.yaml; writes models/pretrain/." in out


def test_unknown_arguments_are_one_line_and_exit_2(capsys):
    code, out, err = _run(_never, ["--epochs", "3"], capsys)
    assert (code, out) == (2, "")
    assert err == "pretrain: error: unrecognized arguments: --epochs 3\n"


def test_no_arguments_runs_main_with_its_arguments():
    seen = []
    run_main("pretrain", lambda *a, **kw: seen.append((a, kw)), 1, doc=DOC, argv=[], x=2)
    assert seen == [((1,), {"x": 2})]


def test_a_positional_argument_goes_to_main_first(capsys):
    seen = []
    run_main("download", seen.append, doc=DOC, argv=["the-verdict"], positional=("name", "a source"))
    assert seen == ["the-verdict"]
    code, _, err = _run(_never, [], capsys, positional=("name", "a source"))
    assert code == 2 and err == "pretrain: error: the following arguments are required: name\n"


def test_argv_defaults_to_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["stages/pretrain.py", "--bogus"])
    with pytest.raises(SystemExit) as exit_info:
        run_main("pretrain", _never)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "pretrain: error: unrecognized arguments: --bogus\n"


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (ConfigError("params.yaml: train.lr must be > 0"), 2, "pretrain: error: params.yaml: train.lr must be > 0\n"),
        (
            TrainingInterrupted("training interrupted at step 3"),
            130,
            "pretrain: error: training interrupted at step 3\n",
        ),
        (KeyboardInterrupt(), 130, "pretrain: interrupted\n"),
    ],
)
def test_errors_are_one_line_with_their_exit_status(exc, code, line, capsys):
    def main():
        raise exc

    assert _run(main, [], capsys) == (code, "", line)


def test_one_exit_code_path_for_every_error(capsys):
    from llm.errors import INTERRUPTED, CheckpointError, LLMError, exit_code, report_error

    class Gone(LLMError):
        exit_code = 3

    assert (LLMError.exit_code, CheckpointError("x").exit_code, Gone("x").exit_code) == (2, 2, 3)
    assert TrainingInterrupted("x").exit_code == INTERRUPTED == 130
    assert (exit_code(KeyboardInterrupt()), exit_code(ValueError("a bug"))) == (130, 1)
    assert report_error("llm generate", Gone("it went")) == 3
    assert report_error("llm generate", KeyboardInterrupt()) == 130
    assert capsys.readouterr() == ("", "llm generate: error: it went\nllm generate: interrupted\n")

    def main():
        raise Gone("the file went away")

    assert _run(main, [], capsys) == (3, "", "pretrain: error: the file went away\n")
