"""End to end: the pipeline through `dvc repro` in a temporary clone, on a tiny profile."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MIRROR, ROOT

TINY = yaml.safe_load((ROOT / "ci" / "profile.yaml").read_text())  # the CI profile: seconds per stage


def sh(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    if not (MIRROR / "the-verdict.txt").is_file():
        pytest.skip("needs ../shared/mirror")
    if shutil.which("git") is None:
        pytest.skip("needs git")
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("data/", "models/")):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "LLM_MIRROR": str(MIRROR),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    sh(["git", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "tiny profile"], repo, env)
    return repo, env


def test_repro_then_nothing_to_do_then_deterministic_rerun(repo):
    path, env = repo
    sh(["dvc", "repro"], path, env)
    for stage in ("prepare_text", "pretrain", "eval", "finetune_spam", "finetune_instruct"):
        assert json.loads((path / f"metrics/{stage}.json").read_text())
    pretrain = json.loads((path / "metrics/pretrain.json").read_text())
    assert pretrain["steps"] > 0 and pretrain["tokens_seen"] > 0
    curve = (path / "metrics/curves/pretrain.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,tokens_seen,examples_seen,train_loss,val_loss,lr" and len(curve) > 1
    samples = json.loads((path / "data/eval/samples.json").read_text())
    assert samples[0]["prompt"] == "Every effort moves you"
    assert (path / "models/pretrain/model.safetensors").is_file()
    spam = json.loads((path / "metrics/finetune_spam.json").read_text())
    assert 0 <= spam["test_accuracy"] <= 1 and spam["baseline_test_accuracy"] > 0.9
    assert len((path / "data/spam/test.csv").read_text().splitlines()) == 301
    responses = json.loads((path / "data/instruct/responses.json").read_text())
    assert len(responses) == 110 and all("model_response" in r for r in responses)
    instruct = json.loads((path / "metrics/finetune_instruct.json").read_text())
    assert {"train_loss", "val_loss", "test_loss", "rouge_l", "exact_match"} <= instruct.keys()
    assert json.loads((path / "metrics/report.json").read_text()) == {"stages_reported": 5, "figures": 6}
    report = (path / "reports/report.md").read_text()
    assert "![Pretraining loss against tokens seen](figures/pretrain_loss.png)" in report and "not run" not in report
    assert len(list((path / "reports/figures").glob("*.png"))) == 6 and (path / "reports/report.html").is_file()

    again = sh(["dvc", "repro"], path, env)
    assert "Running stage" not in again
    assert "up to date" in sh(["dvc", "status"], path, env)

    sh(["dvc", "repro", "-f", "-s", "pretrain"], path, env)  # a forced second run: same numbers
    rerun = json.loads((path / "metrics/pretrain.json").read_text())
    for key in ("train_loss", "val_loss", "tokens_seen", "steps"):
        assert rerun[key] == pretrain[key], key


def test_experiment_with_set_param_and_compare(repo):
    path, env = repo
    sh(["git", "add", "-A"], path, env)
    sh(["git", "commit", "-qm", "baseline results"], path, env)
    sh(["dvc", "exp", "run", "-S", "train.lr=0.002"], path, env)
    diff = json.loads(sh(["dvc", "metrics", "diff", "--json"], path, env))
    assert "train_loss" in diff["metrics/pretrain.json"]
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], path, env))
    lrs = []
    for entry in shown:
        for exp in [entry, *(e for e in (entry.get("experiments") or []) for e in e.get("revs", []))]:
            data = (exp.get("data") or {}).get("params", {}).get("params.yaml", {}).get("data", {})
            if data:
                lrs.append(data["train"]["lr"])
    assert 0.002 in lrs and 0.0004 in lrs

    # llm compare wraps `dvc metrics diff`: HEAD against the workspace the experiment left
    out = subprocess.run(
        [str(Path(sys.executable).parent / "llm"), "compare"], cwd=path, env=env, capture_output=True, text=True
    )
    assert out.returncode in (0, 1), out.stderr
    assert "metrics/pretrain.json:val_loss" in out.stdout and "HEAD -> workspace" in out.stdout
    assert out.returncode == (1 if "REGRESSED" in out.stdout else 0)
    assert out.stdout.strip().splitlines()[-1].startswith("OK:" if out.returncode == 0 else "FAIL:")


def test_bad_param_stops_the_stage_with_one_line(repo):
    path, env = repo
    params = path / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("train_ratio: 0.9", "train_ratio: 1.5"))
        out = subprocess.run(
            [sys.executable, "stages/prepare_text.py"], cwd=path, env=env, capture_output=True, text=True
        )
        assert out.returncode == 2
        assert out.stderr.strip() == "prepare_text: error: params.yaml: data.train_ratio must be in (0, 1), got 1.5"
    finally:
        params.write_text(original)


def test_pretrain_and_eval_start_from_gpt2_weights(repo, tmp_path):
    """model.init: a GPT-2 checkpoint; train.num_epochs 0 measures it and passes it on unchanged."""
    transformers = pytest.importorskip("transformers")
    import torch

    path, env = repo
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=12, n_head=3, n_layer=1)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path / "gpt2")
    params = path / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    raw["train"]["num_epochs"] = 0
    try:
        raw["model"]["init"] = str(tmp_path / "gpt2")
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        out = subprocess.run([sys.executable, "stages/pretrain.py"], cwd=path, env=env, capture_output=True, text=True)
        assert out.returncode == 2  # the tiny profile's model.emb_dim 32 disagrees with the weights' 12
        assert out.stderr.strip().startswith("pretrain: error: model.emb_dim = 32 conflicts with")

        raw["model"].update({k: None for k in ("emb_dim", "n_heads", "n_layers", "context_length")})
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        for stage in ("pretrain", "eval"):
            sh([sys.executable, f"stages/{stage}.py"], path, env)
        metrics = json.loads((path / "metrics/pretrain.json").read_text())
        assert metrics["steps"] == 0 and metrics["tokens_seen"] == 0 and metrics["train_loss"] > 0
        from llm.checkpoint import load_checkpoint

        model = load_checkpoint(path / "models/pretrain")
        ids = torch.randint(0, 50257, (1, 32))
        with torch.no_grad():
            assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4
        assert json.loads((path / "data/eval/samples.json").read_text())[0]["model"] == "pretrain"
    finally:
        params.write_text(original)
