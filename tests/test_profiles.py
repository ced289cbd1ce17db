"""Profiles (llm/pipeline/profiles.py, profiles/*.yaml): each is valid params over the committed params.yaml,
becomes `-S` arguments that read back as the same values, and a bad one is one line."""

import shlex
import subprocess
import sys

import pytest

from llm.errors import ConfigError, LLMError
from llm.pipeline.params import parse_params
from llm.pipeline.profiles import dvc_command, load_profile, parse_set, profile_names, profile_sets, with_profile
from llm.pipeline.validate import read_yaml
from tests.conftest import ROOT, committed_yaml


def test_the_documented_profiles_exist():
    assert {"quick", "shakespeare"} <= set(profile_names(ROOT))


@pytest.mark.parametrize("name", profile_names(ROOT))
def test_each_profile_is_valid_params_over_the_committed_file(name):
    profile = load_profile(name, ROOT)
    params = parse_params(with_profile(committed_yaml("params.yaml"), profile))
    for section, values in profile.items():
        for key, value in values.items():
            assert getattr(getattr(params, section), key) == value, f"{section}.{key}"


@pytest.mark.parametrize("name", profile_names(ROOT))
def test_the_set_arguments_read_back_as_the_profiles_values(name):
    profile = read_yaml(ROOT / "profiles" / f"{name}.yaml")
    for text in profile_sets(profile):
        (section, key), value = parse_set(text)
        assert profile[section][key] == value, text


def test_values_of_every_kind_survive_the_set_arguments():
    profile = {"data": {"corpus": ["tinyshakespeare", "a b.txt"]}, "train": {"start_context": "ROMEO: hi", "lr": 2e-3,
               "compile": True, "max_steps": None}, "eval": {"prompts": ["123", "true"]}}  # fmt: skip
    for text in profile_sets(profile):
        (section, key), value = parse_set(text)
        assert profile[section][key] == value, text


def test_the_command_line_prints_the_dvc_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llm.pipeline.profiles", "quick", "--", "-n", "q1"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    args = shlex.split(out)
    assert args == dvc_command("quick", ROOT, ["-n", "q1"])
    assert args[:3] == ["dvc", "exp", "run"] and args[-2:] == ["-n", "q1"]


def test_an_unknown_profile_is_one_line():
    out = subprocess.run([sys.executable, "-m", "llm.pipeline.profiles", "qiuck"], cwd=ROOT, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no profile 'qiuck'" in out.stderr and "quick" in out.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {lr_typo: 0.1}\n", "params.yaml has no train.lr_typo"),
        ("train: {lr: -1}\n", "train.lr"),
        ("train: 3\n", "must map keys to values"),
    ],
)
def test_a_bad_profile_is_one_line_naming_its_file_and_key(tmp_path, text, message):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "bad.yaml").write_text(text)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    with pytest.raises((ConfigError, LLMError), match=message) as info:
        load_profile("bad", tmp_path)
    assert "\n" not in str(info.value) and "bad.yaml" in str(info.value)


@pytest.mark.parametrize("argv", [["quick", "--run", "--", "-n", "q1"], ["--run", "quick", "--", "-n", "q1"]])
def test_run_runs_the_line_with_dvcs_own_arguments_after_the_separator(argv, monkeypatch):
    """docs/recipes.md's `profiles quick --run -- -n quick`: --run is the script's, what follows `--` dvc's."""
    from llm.pipeline import profiles

    ran = []
    monkeypatch.setattr(profiles.subprocess, "run", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert profiles.main(argv) == 0
    assert ran == [dvc_command("quick", ROOT, ["-n", "q1"])] and "--run" not in ran[0]
