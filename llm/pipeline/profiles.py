"""Profiles: named sets of params over params.yaml, run as DVC experiments.

A profile is a YAML file in `profiles/`, in params.yaml's sections, holding only the keys it changes
(`profiles/quick.yaml`: the whole pipeline in minutes; `profiles/shakespeare.yaml`: pretraining on
tinyshakespeare with the fast recipe of bench/bench_recipes.py). DVC has no overlay files, so a profile
becomes `-S section.key=value` arguments of `dvc exp run`, and the experiment records every value like any
other (`dvc exp show`, `dvc params diff`):

    python -m llm.pipeline.profiles quick                  # prints the `dvc exp run -S ...` line
    python -m llm.pipeline.profiles quick --run            # runs it
    python -m llm.pipeline.profiles shakespeare --run -- eval -n bard   # dvc exp run's own arguments after --

A profile is checked before anything runs: every key must exist in params.yaml and the result must be
valid params (`llm.pipeline.params.parse_params`); a bad one is one line naming the profile and the key.
`ci/run_profile.py` applies the CI profile (ci/profile.yaml) with the same functions.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from ruamel.yaml.error import YAMLError

from llm.errors import ConfigError, LLMError, OneLineParser, first_line, report_error
from llm.pipeline.params import parse_params
from llm.pipeline.validate import parse_yaml, read_yaml

PROFILES = Path("profiles")


def parse_set(text: str) -> tuple[list[str], object]:
    """`-S section.key=value` as DVC reads it: the dotted key, and the value as YAML 1.2."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or len(path) < 2 or not all(path):
        raise LLMError(f"-S {text!r}: give section.key=value, e.g. -S train.lr=0.03")
    try:
        return path, parse_yaml(value)
    except YAMLError as exc:
        raise LLMError(f"-S {text!r}: the value is not YAML: {first_line(exc)}") from None


def with_profile(params: dict, profile: dict, sets: list[str] = ()) -> dict:
    """`params` with each section of `profile` updated, then each `-S section.key=value` applied;
    a key that params.yaml lacks is an error (a typo would silently change nothing)."""
    for text in [*profile_sets(profile), *sets]:
        path, value = parse_set(text)
        node = params
        for i, name in enumerate(path):
            if not isinstance(node, dict) or name not in node:
                raise LLMError(f"-S {text!r}: params.yaml has no {'.'.join(path[: i + 1])}")
            if i < len(path) - 1:
                node = node[name]
        node[path[-1]] = value
    return params


def profile_sets(profile: dict) -> list[str]:
    """The profile as `section.key=value` strings, values in YAML flow style (JSON is YAML): what `-S` takes."""
    sets = []
    for section, values in profile.items():
        if not isinstance(values, dict):
            raise LLMError(f"profile section {section!r} must map keys to values, got {values!r}")
        for key, value in values.items():
            text = value if isinstance(value, str) and value and value == value.strip() and _plain(value) else None
            sets.append(f"{section}.{key}={text if text is not None else json.dumps(value)}")
    return sets


def _plain(text: str) -> bool:
    """Whether YAML reads `text` back as this same string (not a number, bool, null or list)."""
    try:
        return parse_yaml(text) == text
    except YAMLError:
        return False


def profile_names(root: str | Path = ".") -> list[str]:
    return sorted(p.stem for p in (Path(root) / PROFILES).glob("*.yaml"))


def load_profile(name: str, root: str | Path = ".", params_path: str | Path = "params.yaml") -> dict:
    """The profile `name` (profiles/<name>.yaml), checked against params.yaml: one line if it is not there,
    names a key params.yaml lacks, or makes invalid params."""
    path = Path(root) / PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(profile_names(root)) or "none"
        raise ConfigError(f"no profile {name!r} ({path} does not exist); profiles: {known}")
    profile = read_yaml(path) or {}
    if not isinstance(profile, dict):
        raise ConfigError(f"{path} must map params.yaml's sections to the keys it changes")
    try:
        parse_params(with_profile(read_yaml(Path(root) / params_path), profile))
    except LLMError as exc:
        raise ConfigError(f"{path}: {first_line(exc)}") from None
    return profile


def dvc_command(name: str, root: str | Path = ".", extra: list[str] = ()) -> list[str]:
    """`dvc exp run` with the profile's `-S`s, then dvc's own arguments (`extra`: targets, -n, --queue, more
    `-S`s, which DVC applies after the profile's)."""
    args = ["dvc", "exp", "run"]
    for text in profile_sets(load_profile(name, root)):
        args += ["-S", text]
    return [*args, *extra]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = OneLineParser(prog="profiles", usage="%(prog)s NAME [--run] [-- DVC_EXP_RUN_ARGS...]", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("name", help=f"a profile in {PROFILES}/ ({', '.join(profile_names()) or 'none here'})")
    ap.add_argument("--run", action="store_true", help="run the line instead of printing it")
    args = ap.parse_args(own)  # what follows `--` is dvc exp run's own: a target stage, -n NAME, more -S
    try:
        command = dvc_command(args.name, extra=extra)
    except LLMError as exc:
        return report_error("profiles", exc)
    if not args.run:
        print(shlex.join(command))
        return 0
    print(shlex.join(command), file=sys.stderr, flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
