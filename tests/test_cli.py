"""`llm` end to end on a tiny checkpoint made here."""

import subprocess
import sys

import pytest
import torch

from llm.checkpoint import save_checkpoint
from llm.cli import main
from llm.generate import generate
from llm.model import GPTModel
from llm.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from tests.conftest import ROOT, tiny_cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg(context_length=32)).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny"), model


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
