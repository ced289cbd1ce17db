"""dvc.yaml cannot drift from the code: every stage lists exactly the files it imports and reads.

A stage's code deps must be the transitive closure of its script's imports inside the repository
(package `__init__` files included, lazy imports inside functions too); its data deps and outputs
must match the module-level paths the script reads and writes. Edit a module a stage imports and
DVC reruns that stage; forget to declare it and this test fails.
"""

import ast
import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
SOURCES = yaml.safe_load((ROOT / "sources.yaml").read_text())


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def imported_files(script: Path) -> set[str]:
    """The repository's .py files that running `script` as a module can import."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        package = file.relative_to(ROOT).parent.parts
        todo += [ROOT.joinpath(*package[:i], "__init__.py") for i in range(1, len(package) + 1)]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            todo += [f for f in map(module_file, names) if f is not None]
    return {f.relative_to(ROOT).as_posix() for f in seen if f.is_file()}


def stages() -> dict[str, tuple[str, dict]]:
    """{dvc stage name: (stages.<module>, definition)}, foreach stages expanded."""
    out = {}
    for name, stage in DVC["stages"].items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                text = yaml.safe_dump(stage["do"]).replace("${item}", item)
                out[f"{name}@{item}"] = (name, yaml.safe_load(text))
        else:
            out[name] = (name, stage)
    return out


def declared(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def module_paths(module) -> set[str]:
    """Paths a stage script names at module level (also inside dicts, tuples and dataclasses), as posix strings."""
    found: set[str] = set()

    def visit(value):
        if isinstance(value, Path):
            found.add(value.as_posix())
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for v in vars(value).values():
                visit(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)

    for name, value in vars(module).items():
        if name.isupper():
            visit(value)
    from llm.pipeline.finetune import FinetuneStage
    from llm.pipeline.params import PRETRAINED, Params, init_source

    finetunes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, FinetuneStage)]
    for stage in finetunes:  # the model its section's `init` names by default (`pretrain`, `instruct`)
        if getattr(stage, "section", None):
            found.add(Path(init_source(getattr(Params(), stage.section).init)).as_posix())
    if hasattr(module, "init_source") and not finetunes:  # `init: pretrain` reads the pretrain stage's checkpoint
        found.add(PRETRAINED.as_posix())
    if hasattr(module, "load_params") or finetunes:
        found.add("params.yaml")
    return found


# A stage's resume state lives only while it is interrupted: never a dep or an output.
SCRATCH = "models/resume/"


def related(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


STAGES = stages()


def test_every_stage_script_is_a_stage():
    scripts = {p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    assert {module for module, _ in STAGES.values()} == scripts


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_exactly_the_imports(name):
    module, stage = STAGES[name]
    assert stage["cmd"].startswith(f"python -m stages.{module}"), "run as a module: the checkout's llm is imported"
    code = {d for d in declared(stage["deps"]) if d.endswith(".py")}
    wanted = imported_files(ROOT / "stages" / f"{module}.py")
    assert not wanted - code, f"{name} imports these but does not list them in deps: {sorted(wanted - code)}"
    assert not code - wanted, f"{name} lists these deps but never imports them: {sorted(code - wanted)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_data_deps_and_outputs_match_the_paths_the_script_names(name):
    module, stage = STAGES[name]
    files = declared(stage.get("deps")) | declared(stage.get("outs"))
    files |= declared(stage.get("metrics")) | declared(stage.get("plots"))
    files = {f for f in files if not f.endswith(".py")}
    if stage.get("params"):
        files.add("params.yaml")
    named = {n for n in module_paths(importlib.import_module(f"stages.{module}")) if not n.startswith(SCRATCH)}
    assert all(any(related(f, n) for n in named) for f in files), (
        f"{name}: dvc.yaml names {sorted(f for f in files if not any(related(f, n) for n in named))}, "
        "which the script does not"
    )
    assert all(any(related(n, f) for f in files) for n in named), (
        f"{name}: the script names {sorted(n for n in named if not any(related(n, f) for f in files))}, "
        "which dvc.yaml does not declare"
    )


def test_every_source_has_a_download_stage():
    assert DVC["stages"]["download"]["foreach"] == list(SOURCES)


def test_no_output_keeps_dvc_from_its_run_cache():
    """DVC skips the run-cache for a stage with a `persist` output or a plain uncached `outs` entry."""
    for name, (_, stage) in STAGES.items():
        for out in stage.get("outs") or []:
            if isinstance(out, dict):
                (opts,) = out.values()
                assert not opts.get("persist") and opts.get("cache", True), f"{name}: {out}"


# --- what a stage's code deps may not hold -------------------------------------------------------------
# The settings parser imports no implementation (llm.choices, llm.config and llm.bounds hold the names,
# presets and bounds it checks), so a stage depends only on the code it runs: an edit to the judge or
# the server no longer reruns tokenization and pretraining.
MODEL = {"llm/model.py", "llm/gpt2.py", "llm/checkpoint.py", "llm/generate.py"}
TRAINING = {"llm/trainer.py", "llm/distributed.py", "llm/losses.py", "llm/schedule.py", "llm/runtime.py"}
FINETUNING = {"llm/pipeline/finetune.py", "llm/classifier.py", "llm/instruct.py", "llm/pooling.py", "llm/prompts.py"}
FINETUNING |= {"stages/finetune_spam.py", "stages/finetune_instruct.py"}
LORA, JUDGE = {"llm/lora.py"}, {"llm/judge.py"}


def code_deps(name: str) -> set[str]:
    return {d for d in declared(STAGES[name][1]["deps"]) if d.endswith(".py")}


def serving(deps: set[str]) -> set[str]:
    return {d for d in deps if d.startswith("llm/serve/") or d == "llm/cli.py"}


def test_tokenization_depends_on_no_model_training_finetuning_lora_judge_or_serving_code():
    deps = code_deps("prepare_text")
    assert not deps & (MODEL | TRAINING | FINETUNING | LORA | JUDGE) and not serving(deps), sorted(
        deps & (MODEL | TRAINING | FINETUNING | LORA | JUDGE) | serving(deps)
    )


def test_pretraining_depends_on_no_finetuning_judge_or_serving_code():
    deps = code_deps("pretrain")
    assert not deps & (FINETUNING | JUDGE) and not serving(deps), sorted(deps & (FINETUNING | JUDGE) | serving(deps))


def test_an_edit_to_the_judge_makes_dvc_status_name_only_the_stages_that_import_it(tmp_path):
    """In a scratch clone (the committed dvc.lock holds every code dep's md5; the outputs are not
    there, which dvc status reports too and this test ignores), append a line to llm/judge.py: the
    stages `dvc status` names llm/judge.py for are exactly those whose deps list it, and neither
    tokenization nor pretraining is among them."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, capture_output=True)
    with open(clone / "llm/judge.py", "a") as f:
        f.write("# an edit\n")
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    named = {
        stage
        for stage, entries in status.items()
        for entry in entries
        if isinstance(entry, dict) and "llm/judge.py" in entry.get("changed deps", {})
    }
    committed = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    users = {name for name, stage in committed.items() if "llm/judge.py" in declared(stage.get("deps"))}
    assert named == users and users and not users & {"prepare_text", "pretrain", "eval"}, (named, users)
