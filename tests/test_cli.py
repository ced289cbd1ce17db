"""`llm` end to end on a tiny checkpoint made here."""

import argparse
import errno
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.cli import main
from llm.generate import generate
from llm.model import GPTModel
from llm.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from tests.conftest import ROOT, tiny_cfg


def test_generate_prints_the_greedy_continuation(ckpt, capsys):
    path, model = ckpt
    assert main(["generate", "--checkpoint", str(path), "--prompt", "Every effort", "--max-new-tokens", "12"]) == 0
    tok = get_tokenizer()
    expected = token_ids_to_text(generate(model, text_to_token_ids("Every effort", tok), 12, 32), tok)
    assert capsys.readouterr().out == expected + "\n"


def test_sampling_with_seed_is_reproducible(ckpt, capsys):
    path, _ = ckpt
    args = ["generate", "--checkpoint", str(path), "--prompt", "Hi", "--temperature", "1.4"]
    args += ["--top-k", "50", "--top-p", "0.95", "--seed", "123", "--max-new-tokens", "20"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first and first.startswith("Hi")


def test_python_dash_m_and_console_script_stream(ckpt):
    path, _ = ckpt
    cmd = [sys.executable, "-m", "llm", "generate", "--checkpoint", str(path), "--prompt", "Once"]
    out = subprocess.run(cmd + ["--max-new-tokens", "5"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once") and len(out.stdout) > len("Once\n")
    helptext = subprocess.run([sys.executable, "-m", "llm", "--help"], capture_output=True, text=True).stdout
    assert "generate" in helptext


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "/no/such/ckpt", "--prompt", "x"], "checkpoint /no/such/ckpt does not exist"),
        (["--prompt", "   "], "--prompt is empty"),
        (["--prompt", "word " * 39 + "word"], "--prompt is 40 tokens; this model's context_length is 32"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["--prompt", "x", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(ckpt, capsys, args, message):
    path, _ = ckpt
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(path), *args]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def _pyproject_version() -> str:
    import re

    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)


def test_version_prints_the_distribution_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"llm {_pyproject_version()}\n"  # the venv installs this checkout


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch, capsys):
    import importlib.metadata

    from llm.cli import build_parser

    asked = []

    def not_installed(name):
        asked.append(name)
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"llm {_pyproject_version()}\n"
    assert asked == ["llm-from-scratch-dvc"]  # the distribution's name, not the package's


def test_errors_name_the_command_the_user_typed(monkeypatch, capsys):
    from llm.cli import program_name

    assert program_name("/venv/bin/llm-from-scratch") == "llm-from-scratch"
    assert program_name("/venv/Scripts/llm-from-scratch.exe") == "llm-from-scratch"
    assert program_name("/repo/llm/__main__.py") == program_name("/usr/bin/pytest") == "llm"
    monkeypatch.setattr("sys.argv", ["/venv/bin/llm-from-scratch"])
    assert main(["generate", "--checkpoint", "/no/such/ckpt", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.startswith("llm-from-scratch generate: error: checkpoint /no/such/ckpt")


def test_ctrl_c_is_one_line_and_exit_130(ckpt, monkeypatch, capsys):
    path, _ = ckpt

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llm.generate.generate_stream", interrupted)
    assert main(["generate", "--checkpoint", str(path), "--prompt", "Hi"]) == 130
    assert capsys.readouterr().err == "llm generate: interrupted\n"


def test_both_console_scripts_are_installed_and_run():
    """`llm` and the unambiguous `llm-from-scratch` are the same command of llm-from-scratch-dvc."""
    import subprocess
    import sys
    from importlib.metadata import distribution
    from pathlib import Path

    scripts = {ep.name: ep.value for ep in distribution("llm-from-scratch-dvc").entry_points}
    assert scripts == {"llm": "llm.cli:main", "llm-from-scratch": "llm.cli:main"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "llm-from-scratch"), "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("llm-from-scratch ")


# --- every output a command writes: one line and nothing half-written when it cannot be -----------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ckpt):
    """A tiny model of each kind and an input file for each command that writes a file."""
    from llm.classifier import add_classification_head, save_classifier

    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(1)
    classifier = save_classifier(
        add_classification_head(GPTModel(tiny_cfg(context_length=16)), 2), root / "spam", 8, "mean"
    )
    (root / "m.txt").write_text("WIN a prize\nsee you at 5\n")
    (root / "q.jsonl").write_text('{"instruction": "Name a color."}\n')
    for side in ("old", "new"):
        (root / side).mkdir()
        (root / side / "pretrain.json").write_text('{"val": {"loss": 5.0}}')
    (root / "gates.yaml").write_text("metrics/pretrain.json:\n  val.loss: {worse: higher, max_change: 2%}\n")
    return {
        "classify": ["classify", "--model", str(classifier), "--file", str(root / "m.txt"), "--output"],
        "instruct": ["instruct", "--model", str(ckpt[0]), "--file", str(root / "q.jsonl")]
        + ["--max-new-tokens", "2", "--output"],
        "export": ["export", "--model", str(ckpt[0]), "--out"],
        "compare": ["compare", "--old", str(root / "old"), "--new", str(root / "new")]
        + ["--thresholds", str(root / "gates.yaml"), "--markdown"],
    }


OUTPUTS = {"classify": "--output", "instruct": "--output", "export": "--out", "compare": "--markdown"}
PRINTING = ["generate", "classify", "instruct", "export", "compare"]
# Runs until stopped, writes no file and nothing to standard output (its lines go to stderr): tests/test_serve*.py
SERVING = ["serve"]


def _subcommands():
    from llm.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_and_output_flag_is_in_the_failure_tests_below():
    """A new command, or a new option that names a file to write, joins OUTPUTS / PRINTING (and so
    the tests of unwritable outputs and of a failing standard output) or fails here."""
    writes = {"--output", "--out", "--markdown", "--output-dir", "--save", "--log"}
    found = {
        name: flag for name, sub in _subcommands().items() for action in sub._actions
        for flag in action.option_strings if flag in writes
    }  # fmt: skip
    assert found == OUTPUTS
    assert sorted(_subcommands()) == sorted(PRINTING + SERVING)


def _tree(folder):
    return sorted(
        (p.relative_to(folder).as_posix(), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")
    )


def _fails_in_one_line(capsys, argv, *expected):
    code = main(argv)
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith(f"llm {argv[0]}: error: "), err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("command", OUTPUTS)
def test_an_output_where_a_directory_or_a_file_is_is_refused_before_any_work(command, inputs, tmp_path, capsys):
    flag = OUTPUTS[command]
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("a regular file\n")
    before = _tree(tmp_path)
    wrong_kind = tmp_path / ("file" if command == "export" else "taken")
    _fails_in_one_line(capsys, [*inputs[command], str(wrong_kind)], f"{flag} {wrong_kind} is a ")
    under = tmp_path / "file" / "out"
    _fails_in_one_line(
        capsys, [*inputs[command], str(under)], f"{flag} {under}: {tmp_path / 'file'} is not a directory"
    )
    assert _tree(tmp_path) == before


def _read_only(monkeypatch, folder):
    """Opening anything under `folder` for writing fails as on a read-only file system (tests run
    as root, which a chmod would not stop)."""
    import builtins
    import os

    real_os_open, real_open = os.open, builtins.open

    def refuse(path):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)


def _disk_full(monkeypatch, folder):
    """Writes under `folder` put half their bytes down, then fail as a full disk does (no file name)."""
    import pathlib

    import llm.checkpoint

    real_write_bytes, real_save_file = pathlib.Path.write_bytes, llm.checkpoint.save_file
    full = OSError(errno.ENOSPC, "No space left on device")

    def write_bytes(self, data):
        if str(self).startswith(str(folder)):
            real_write_bytes(self, data[: len(data) // 2])
            raise full
        return real_write_bytes(self, data)

    def save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise full

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    monkeypatch.setattr(llm.checkpoint, "save_file", save_file)


@pytest.mark.parametrize("command", OUTPUTS)
@pytest.mark.parametrize("failure", ["read-only", "disk full"])
def test_an_output_that_fails_to_write_is_one_line_and_leaves_the_old_file(
    command, failure, inputs, tmp_path, monkeypatch, capsys
):
    flag = OUTPUTS[command]
    target = tmp_path / "out"
    if command == "export":
        target.mkdir()
        (target / "config.json").write_text("old\n")
    else:
        target.write_text("old\n")
    before = _tree(tmp_path)
    if failure == "read-only":
        _read_only(monkeypatch, tmp_path)
        reason = "Read-only file system"
    else:
        _disk_full(monkeypatch, tmp_path)
        reason = "No space left on device"
    _fails_in_one_line(capsys, [*inputs[command], str(target)], f"cannot write {flag} {target}: {reason}")
    monkeypatch.undo()
    assert _tree(tmp_path) == before  # no temporary left, the old file whole


def test_markdown_is_appended_whole_to_a_file_or_written_to_a_device(inputs, tmp_path, capsys):
    summary = tmp_path / "summary.md"
    summary.write_text("# Job\n")
    assert main([*inputs["compare"], str(summary)]) == 0
    assert main([*inputs["compare"], str(summary)]) == 0
    text = summary.read_text()
    assert text.startswith("# Job\n### Metrics: ") and text.count("### Metrics: ") == 2
    capsys.readouterr()
    _fails_in_one_line(capsys, [*inputs["compare"], "/dev/full"], "cannot write --markdown /dev/full: No space left")


def test_a_device_is_refused_as_an_output_replaced_whole(inputs, capsys):
    """Replacing /dev/null by renaming a file onto it would remove the device (we run as root)."""
    _fails_in_one_line(capsys, [*inputs["classify"], "/dev/null"], "--output /dev/null is not a regular file")
    assert Path("/dev/null").is_char_device()


# --- standard output: a closed pipe is quiet (141), a full disk one line -------------------------------
class _Stdout:
    def __init__(self, exc):
        self.exc = exc

    def write(self, text):
        raise self.exc

    def flush(self):
        raise self.exc


@pytest.fixture(scope="module")
def printing(inputs, ckpt, tmp_path_factory):
    """A command line of each command that prints to standard output."""
    out = tmp_path_factory.mktemp("printing")
    return {
        "generate": ["generate", "--model", str(ckpt[0]), "--prompt", "Hi", "--max-new-tokens", "3"],
        "classify": inputs["classify"][:-3] + ["a message"],
        "instruct": ["instruct", "--model", str(ckpt[0]), "Name a color.", "--max-new-tokens", "2"],
        "export": [*inputs["export"], str(out / "hf")],
        "compare": inputs["compare"][:-1],
    }


@pytest.mark.parametrize("command", PRINTING)
def test_standard_output_that_fails_is_one_line_and_a_closed_pipe_is_quiet(command, printing, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _Stdout(OSError(errno.ENOSPC, "No space left on device")))
    assert main(printing[command]) == 2
    assert (
        capsys.readouterr().err == f"llm {command}: error: cannot write to standard output: No space left on device\n"
    )
    monkeypatch.setattr("sys.stdout", _Stdout(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    assert main(printing[command]) == 141
    assert capsys.readouterr().err == ""


def test_generate_into_a_pipe_closed_early_exits_141_without_a_word(ckpt):
    path, _ = ckpt
    cmd = [sys.executable, "-m", "llm", "generate", "--model", str(path), "--prompt", "Once upon a time"]
    proc = subprocess.Popen([*cmd, "--max-new-tokens", "200"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err.decode()) == (141, "")
    shell = f"{shlex.join(cmd)} --max-new-tokens 200 | head -c 10"
    out = subprocess.run(["bash", "-c", shell], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (0, "Once upon ", "")


def test_generate_into_a_full_or_closed_stdout_is_one_line(ckpt):
    path, _ = ckpt
    args = ["generate", "--model", str(path), "--prompt", "Once", "--max-new-tokens", "5"]
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "llm", *args], cwd=ROOT, stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120)  # fmt: skip
    assert (out.returncode, out.stderr) == (
        2,
        "llm generate: error: cannot write to standard output: No space left on device\n",
    )
    out = subprocess.run(["bash", "-c", f"{shlex.join([sys.executable, '-m', 'llm', *args])} >&-"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (out.returncode, out.stderr) == (
        2,
        "llm generate: error: cannot write to standard output: Bad file descriptor\n",
    )


# --- sampling settings and seeds ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "nan"], "temperature must be >= 0 and finite (0 = greedy), got nan"),
        (["--temperature", "inf"], "temperature must be >= 0 and finite (0 = greedy), got inf"),
        (["--temperature=-inf"], "temperature must be >= 0 and finite (0 = greedy), got -inf"),
        (["--temperature", "1", "--top-p", "nan"], "top_p must be in (0, 1], got nan"),
        (["--temperature", "1", "--top-p", "inf"], "top_p must be in (0, 1], got inf"),
        (["--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--temperature", "1e-300"], "temperature must be 0 (greedy) or at least 0.001, got 1e-300"),  # was NaN
    ],
)
def test_non_finite_sampling_settings_are_refused_before_anything_is_printed(ckpt, capsys, args, message):
    _fails_in_one_line(capsys, ["generate", "--model", str(ckpt[0]), "--prompt", "Hi", *args], message)


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64), "1.5", "abc"])
def test_a_seed_out_of_range_is_one_line(ckpt, capsys, seed):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(ckpt[0]), "--prompt", "Hi", "--seed", seed])
    out, err = capsys.readouterr()
    assert (exit_info.value.code, out) == (2, "")
    assert err.startswith("llm generate: error: argument --seed: must be ") and err.count("\n") == 1
    assert "[0, 4294967295]" in err


@pytest.mark.parametrize("seed", ["0", str(2**32 - 1)])
def test_the_seed_range_ends_are_accepted(ckpt, capsys, seed):
    args = ["generate", "--model", str(ckpt[0]), "--prompt", "Hi", "--seed", seed, "--temperature", "1"]
    assert main([*args, "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


def test_a_bad_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "x"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == "llm generate: error: the following arguments are required: --model/--checkpoint\n"
    )


def test_a_tiny_top_p_generates_the_greedy_text(ckpt, capsys):
    """top_p 1e-300 (below float32's range) keeps the most likely token alone: the greedy text, not a crash."""
    args = ["generate", "--model", str(ckpt[0]), "--prompt", "Hi", "--max-new-tokens", "5"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", "1", "--top-p", "1e-300", "--seed", "1"]) == 0
    assert capsys.readouterr().out == greedy


def test_exporting_a_classifier_says_it_is_a_classifier(classifier_ckpt, tmp_path, capsys):
    """A spam classifier's head scores 2 classes, not tokens: `llm export` says so in one line
    (before: a strict-loading error about an unexpected `out_head.bias`) and writes nothing."""
    path, _ = classifier_ckpt
    assert main(["export", "--model", str(path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a classifier (its head has 2 class outputs" in err
    assert "only a language model exports to GPT-2" in err and not (tmp_path / "hf").exists()
