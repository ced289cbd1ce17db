"""Shared test setup: the committed defaults, the public inputs, a tiny model config.

The suite never reads the working params.yaml (which `dvc exp apply` rewrites): `committed()`
gives the file as of HEAD. Public inputs come the way the pipeline gets them: LLM_MIRROR when set
(CI points it at ../shared/mirror), the canonical URL otherwise; `public_input` skips a test
only when neither answers and this is not CI, where it fails instead.
"""

import functools
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MIRROR = os.environ.get("LLM_MIRROR") or None  # read once: some tests unset it for themselves

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@functools.cache
def committed(rel: str) -> str:
    """The text of a repository file as of HEAD (the file itself outside a git checkout)."""
    try:
        out = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout
    except (OSError, subprocess.CalledProcessError):
        return (ROOT / rel).read_text()


def committed_yaml(rel: str):
    """A committed YAML file, read as YAML 1.2 like DVC and the project read it."""
    from llm.pipeline.validate import parse_yaml

    return parse_yaml(committed(rel))


def unavailable(reason: str):
    """Skip, or fail in CI, where every test must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: nothing may be skipped)")
    pytest.skip(reason)


def scratch_repo(path: Path):
    """A runner `sh(*args) -> stdout` for git, dvc and the venv's `llm` in the scratch repository
    `path`: the venv's tools first on PATH, a commit identity, no analytics, no stdin; a command that
    fails fails the test with its output. Also returns the env, for a command whose failure is the test."""
    import shutil
    import sys

    if shutil.which("git") is None:
        unavailable("needs git")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def sh(*args):
        out = subprocess.run(args, cwd=path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
        return out.stdout

    return sh, env


@functools.cache
def _fetched(name: str, folder: str) -> Path:
    from llm.pipeline.download import fetch_source
    from llm.pipeline.sources import parse_sources

    return fetch_source(parse_sources(committed_yaml("sources.yaml"))[name], Path(folder) / name, mirror=MIRROR)


@pytest.fixture(scope="session")
def public_input(tmp_path_factory):
    """`public_input("the-verdict")` → the verified file of that source in sources.yaml."""
    folder = tmp_path_factory.mktemp("public-inputs")

    def get(name: str) -> Path:
        from llm.errors import LLMError

        try:
            return _fetched(name, str(folder))
        except LLMError as exc:
            unavailable(f"public input {name} unavailable (set LLM_MIRROR or go online): {exc}")

    return get


def tiny_cfg(**overrides):
    """A model small enough for unit tests, with deliberately odd sizes."""
    cfg = {
        "vocab_size": 50257,
        "context_length": 24,
        "emb_dim": 36,
        "n_heads": 3,
        "n_layers": 2,
        "drop_rate": 0.0,
        "qkv_bias": False,
    }
    cfg.update(overrides)
    return cfg


def _dpo_side(margin, accuracy, loss):
    return {
        "loss": loss,
        "chosen_reward": margin / 2,
        "rejected_reward": 0.0 - margin / 2,  # not -0.0
        "reward_margin": margin,
        "preference_accuracy": accuracy,
        "logprob_margin": 0.25 + margin,
        "logprob_accuracy": 0.5 + accuracy / 4,
    }


def dpo_metrics():
    """A metrics/finetune_dpo.json of the shape stage finetune_dpo writes (split -> before/after -> name,
    ROUGE-L on test), with made-up values: "before" is the reference scored against itself."""
    before = _dpo_side(0.0, 0.0, 0.6931471805599453)
    out = {s: {"before": dict(before), "after": _dpo_side(m, a, 0.6)} for s, m, a in
           (("train", 0.5, 0.9), ("val", 0.25, 0.75), ("test", 0.125, 0.625))}  # fmt: skip
    out["test"]["before"].update(rouge_l_chosen=0.2, rouge_l_rejected=0.3)
    out["test"]["after"].update(rouge_l_chosen=0.35, rouge_l_rejected=0.15)
    return {**out, "steps": 12, "tokens_seen": 24576, "parameters": {"trainable": 2_000, "total": 2_000}}


# --- tiny checkpoints of each kind, written once per test module (the `llm` commands and `llm serve` read them)
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(path, model): a tiny language model (context 32), as `llm generate` reads it."""
    from llm.checkpoint import save_checkpoint
    from llm.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(tiny_cfg(context_length=32)).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny"), model


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    """(path, model): a tiny spam classifier (mean pooling, max_length 8), as `llm classify` reads it."""
    from llm.classifier import add_classification_head, save_classifier
    from llm.model import GPTModel

    torch.manual_seed(2)
    model = add_classification_head(GPTModel(tiny_cfg(context_length=16)), 2)
    path = save_classifier(model, tmp_path_factory.mktemp("cls") / "spam", max_length=8, pooling="mean")
    return path, model.eval()


@pytest.fixture(scope="module")
def instruct_ckpt(tmp_path_factory):
    """The path of a tiny instruction model (context 64) that records the Alpaca prompt style."""
    from llm.checkpoint import save_checkpoint
    from llm.model import GPTModel

    torch.manual_seed(3)
    model = GPTModel(tiny_cfg(context_length=64))
    return save_checkpoint(model, tmp_path_factory.mktemp("ins") / "m", extra={"instruct": {"prompt_style": "alpaca"}})


@pytest.fixture(scope="module")
def dpo_ckpt(tmp_path_factory):
    """The path of a tiny preference-tuned model (context 64) saved as stage finetune_dpo saves it: in a
    folder named `dpo`, recording the Alpaca prompt style and its DPO settings."""
    from llm.checkpoint import save_checkpoint
    from llm.model import GPTModel

    torch.manual_seed(5)
    model = GPTModel(tiny_cfg(context_length=64))
    extra = {
        "instruct": {"prompt_style": "alpaca", "init": "models/instruct"},
        "dpo": {"init": "models/instruct", "beta": 0.1},
    }
    return save_checkpoint(model, tmp_path_factory.mktemp("dpo") / "dpo", extra=extra)


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """The path of a tiny language model with a context of 1024, so that a generation lasts long enough to be
    interrupted (from "Hi" its greedy text runs 1000 tokens without <|endoftext|>)."""
    from llm.checkpoint import save_checkpoint
    from llm.model import GPTModel

    torch.manual_seed(4)
    return save_checkpoint(GPTModel(tiny_cfg(context_length=1024)).eval(), tmp_path_factory.mktemp("long") / "long")


@pytest.fixture
def verdict_text(public_input):
    return public_input("the-verdict").read_text(encoding="utf-8")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped test is a failed one: the suite must run everything there."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """... and so is a module skipped whole (a missing dev dependency, say)."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"
