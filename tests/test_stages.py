"""Stage scripts as a user meets them: `--help` says what a stage reads and writes; nothing else
is accepted on the command line."""

import runpy
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_dvc_yaml import STAGES

MODULES = sorted({module for module, _ in STAGES.values()})


@pytest.mark.parametrize("module", MODULES)
def test_help_prints_what_the_stage_reads_and_writes(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"stages/{module}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"stages.{module}", run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert f"Stage {module}" in out and "Reads" in out and "writes" in out.lower()


@pytest.mark.parametrize("module", MODULES)
def test_unknown_arguments_stop_before_any_work(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"stages/{module}.py", "x", "--epochs", "3"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"stages.{module}", run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "unrecognized arguments" in err


@pytest.mark.parametrize("module", MODULES)
def test_a_python_without_the_project_stops_with_one_line_that_says_to_activate(module):
    """dvc.yaml calls the first `python` on PATH: run without the venv active (`.venv/bin/dvc repro`),
    that Python lacks the project and its packages. `-S` (no site-packages) stands in for it: one
    line that names the interpreter and the fix, exit 1, instead of a ModuleNotFoundError traceback."""
    out = subprocess.run([sys.executable, "-S", "-m", f"stages.{module}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == "" and out.stderr.count("\n") == 1, out.stderr
    assert "has no 'pydantic' module" in out.stderr and "source .venv/bin/activate" in out.stderr


def test_the_packages_the_stages_check_for_are_what_pyproject_installs_and_every_stage_imports():
    from stages import REQUIRED

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert all(f'"{name}>=' in pyproject for name in REQUIRED)
    for module in MODULES:  # each stage, in a fresh interpreter, imports every one of them
        code = f"import sys, stages.{module}; print(all(m in sys.modules for m in {REQUIRED!r}))"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert out.stdout.strip() == "True", (module, out.stderr)
