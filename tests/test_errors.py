"""`run_main` and `report_error`: what a stage script and `llm` do with their command line and
with every error that ends them (one line, an exit status), and `read_text`."""

import errno
import sys

import pytest

from llm.errors import (
    ConfigError,
    LLMError,
    describe,
    exit_code,
    first_line,
    report_error,
    reportable,
    run_main,
)
from llm.files import naming, read_text, writing
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


# --- one place for every error that ends a command -----------------------------------------------------
UNEXPECTED_OS_ERRORS = [
    (errno.ENOSPC, "No space left on device"),
    (errno.EROFS, "Read-only file system"),
    (errno.EACCES, "Permission denied"),
    (errno.EISDIR, "Is a directory"),
    (errno.ENOTDIR, "Not a directory"),
    (errno.EIO, "Input/output error"),
]


def _cli_line(monkeypatch, capsys, exc):
    """What `llm generate` prints and returns when its command raises `exc`."""
    from llm import cli

    def command(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_generate", command)  # build_parser reads it when main runs
    code = cli.main(["generate", "--model", "m", "--prompt", "p"])
    out, err = capsys.readouterr()
    assert out == ""
    return code, err


@pytest.mark.parametrize(("number", "reason"), UNEXPECTED_OS_ERRORS)
def test_an_unexpected_os_error_is_one_line_naming_the_file_in_both_entry_points(number, reason, monkeypatch, capsys):
    """The stage scripts (`run_main`) and `llm` (`cli.main`) share `report_error`: the file, the
    reason in os.strerror's words (not Python's repr), exit 2."""
    exc = OSError(number, "whatever the C library said", "/out/model.safetensors")

    def main():
        raise exc

    assert _run(main, [], capsys) == (2, "", f"pretrain: error: /out/model.safetensors: {reason}\n")
    assert _cli_line(monkeypatch, capsys, exc) == (2, f"llm generate: error: /out/model.safetensors: {reason}\n")


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),  # a write: no file name
        (OSError(errno.EXDEV, "x", "/tmp/.a.tmp", None, "/mnt/a"), "/tmp/.a.tmp -> /mnt/a: Invalid cross-device link"),
        (OSError("disk full"), "disk full"),  # no errno
        (TimeoutError("timed out\nsecond line"), "timed out"),
        (MemoryError(), "out of memory: try a smaller batch or model"),
        (LLMError("two\nlines"), "two lines"),
    ],
)
def test_every_reported_error_is_exactly_one_line(exc, line, capsys):
    def main():
        raise exc

    assert _run(main, [], capsys) == (2, "", f"pretrain: error: {line}\n")


def test_out_of_memory_from_torch_is_one_line_without_its_advice(capsys):
    import torch

    exc = torch.OutOfMemoryError(  # a RuntimeError, as CUDA raises it
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB.\n"
        "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    assert reportable(exc) and exit_code(exc) == 2
    assert report_error("llm generate", exc) == 2
    err = capsys.readouterr().err
    assert err == "llm generate: error: out of memory (CUDA out of memory): try a smaller batch or model\n"
    assert not reportable(RuntimeError("a bug"))


def test_a_bug_keeps_its_traceback():
    """Anything else is a bug: it propagates (Python prints the traceback, status 1)."""

    def main():
        raise ValueError("a bug")

    assert not reportable(ValueError()) and not reportable(SystemExit(0)) and exit_code(ValueError()) == 1
    with pytest.raises(ValueError, match="a bug"):
        run_main("pretrain", main, argv=[])
    with pytest.raises(SystemExit) as exit_info:
        run_main("pretrain", lambda: sys.exit(5), argv=[])
    assert exit_info.value.code == 5


def test_a_broken_pipe_is_quiet_and_exits_141(capsys, monkeypatch):
    from llm.errors import BROKEN_PIPE

    def main():
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    assert BROKEN_PIPE == 141
    assert _run(main, [], capsys) == (141, "", "")
    assert _cli_line(monkeypatch, capsys, BrokenPipeError(errno.EPIPE, "Broken pipe")) == (141, "")


def test_stdout_errors_name_standard_output(monkeypatch, capsys):
    from llm.files import flush_stdout, write_stdout

    class Full:
        def write(self, text):
            return len(text)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sys.stdout", Full())
    with pytest.raises(OSError) as info:
        write_stdout("x", flush=True)
    assert describe(info.value) == "cannot write to standard output: No space left on device"
    with pytest.raises(OSError, match="No space"):
        flush_stdout()
    monkeypatch.setattr("sys.stdout", None)  # started with `>&-`
    with pytest.raises(OSError) as info:
        write_stdout("x")
    assert describe(info.value) == "cannot write to standard output: Bad file descriptor"
    flush_stdout()  # nothing to flush


def test_naming_and_writing_attach_the_users_file(tmp_path):
    with pytest.raises(OSError) as info, naming(tmp_path / "a.csv"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert describe(info.value) == f"{tmp_path / 'a.csv'}: No space left on device"
    with pytest.raises(OSError) as info, naming(tmp_path / "a.csv"):
        raise OSError(errno.EACCES, "Permission denied", "/elsewhere")
    assert info.value.filename == "/elsewhere"  # a file name it has is kept
    with (
        pytest.raises(LLMError, match=r"^cannot write --output p.csv: Read-only file system$"),
        writing("--output p.csv"),
    ):
        raise OSError(errno.EROFS, "x", "/d/.p.csv.123.tmp")  # the temporary's name is not the user's
    with pytest.raises(BrokenPipeError), writing("--output p.csv"):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


# --- text files: UTF-8 or one line naming the byte ----------------------------------------------------
def test_read_text_is_utf8_with_the_bom_dropped_and_newlines_made_plain(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n\xc3\xa9")
    assert read_text(path) == "one\ntwo\nthree\né"


@pytest.mark.parametrize(
    ("data", "offset", "line"),
    [
        (b"caf\xe9\n", 3, 1),  # Latin-1
        (b"ok\nok\n\xff\xfeh\x00i\x00", 6, 3),  # UTF-16
        (b"\xef\xbb\xbfabc\n\xc3", 7, 2),  # cut in the middle of a character, after a BOM
    ],
)
def test_read_text_names_the_file_and_the_first_bad_byte(tmp_path, data, offset, line):
    path = tmp_path / "m.txt"
    path.write_bytes(data)
    with pytest.raises(LLMError) as info:
        read_text(path, "--file")
    message = str(info.value)
    assert message.startswith(f"--file {path} is not UTF-8 text: byte ") and "\n" not in message
    assert f"at offset {offset} (line {line})" in message
    assert data[offset : offset + 1] == eval(message.split("byte ")[1].split(" at")[0])  # noqa: S307 - a bytes repr


def test_read_text_of_a_missing_file_or_a_directory(tmp_path):
    with pytest.raises(LLMError, match=f"^cannot read {tmp_path / 'no'}: No such file or directory$"):
        read_text(tmp_path / "no")
    with pytest.raises(LLMError, match="^cannot read --file .*: Is a directory$"):
        read_text(tmp_path, "--file")


def test_first_line_of_a_message_that_spans_several_or_of_none():
    assert first_line(RuntimeError("\n  cannot write: disk full  \nadvice\nmore advice")) == "cannot write: disk full"
    assert first_line(ValueError("")) == "ValueError"
