"""Stage scripts as a user meets them: `--help` says what a stage reads and writes; nothing else
is accepted on the command line."""

import runpy
import sys

import pytest

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
