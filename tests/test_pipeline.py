"""End to end, the way a DVC user works: `dvc repro`, `dvc exp run`, the queue, the run-cache and
a remote, in a temporary git repository holding the project with the CI profile applied.

What these prove: a forced rerun changes no output a later stage reads; a parameter set run
before is restored from DVC's run-cache without training; a queued experiment runs the code it
was queued with, not the workspace's; `dvc push` then `dvc pull` in a fresh clone leaves nothing
to rerun; a deliberate regression fails the CI gate.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, committed_yaml, unavailable

PROFILE = yaml.safe_load((ROOT / "ci" / "profile.yaml").read_text())  # the CI profile
STAGES = ("prepare_text", "pretrain", "eval", "finetune_spam", "finetune_instruct", "finetune_dpo", "report")
BIN = Path(sys.executable).parent


def sh(args, cwd, env, ok=True):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if ok:
        assert out.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out.stdout}\n{out.stderr}"
    return out


def profiled_params() -> str:
    params = committed_yaml("params.yaml")
    for section, values in PROFILE.items():
        params[section].update(values)
    return yaml.safe_dump(params, sort_keys=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    if shutil.which("git") is None:
        unavailable("needs git")
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    listed = sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], ROOT, None).stdout.split("\0")
    for rel in filter(None, listed):  # what a commit of the working tree would hold
        if (ROOT / rel).is_file() and not rel.startswith(("data/", "models/")):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    (repo / "params.yaml").write_text(profiled_params())  # the committed defaults, not an applied experiment
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    sh(["git", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "CI profile"], repo, env)
    out = sh(["dvc", "repro"], repo, env, ok=False)
    if out.returncode and "cannot download" in out.stdout + out.stderr and not os.environ.get("LLM_MIRROR"):
        unavailable("the pipeline's public inputs are unreachable: set LLM_MIRROR or go online")
    assert out.returncode == 0, f"dvc repro failed:\n{out.stdout}\n{out.stderr}"
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline results"], repo, env)
    return repo, env


def metrics(path: Path) -> dict:
    return {stage: json.loads((path / f"metrics/{stage}.json").read_text()) for stage in STAGES}


def gate(path: Path, env) -> subprocess.CompletedProcess:
    """The CI gate on one run: `llm compare` of `path`'s metrics against the committed CI baseline's
    replicates (their spread stands for the run's: Student's t on the baseline's spread)."""
    olds = sorted((ROOT / "ci/baseline").glob("replicate-*"))
    assert len(olds) >= 3, "ci/baseline holds the replicates of the CI profile"
    args = [BIN / "llm", "compare", "--old", *olds, "--new", path / "metrics"]
    return sh([*map(str, args), "--thresholds", str(ROOT / "thresholds.yaml")], path, env, ok=False)


def test_pipeline_outputs(repo):
    path, env = repo
    m = metrics(path)
    assert m["pretrain"]["steps"] > 0 and m["pretrain"]["tokens_seen"] > 0
    curve = (path / "metrics/curves/pretrain.csv").read_text().splitlines()
    assert curve[0] == "step,epoch,tokens_seen,examples_seen,train_loss,val_loss,lr" and len(curve) > 1
    assert json.loads((path / "data/eval/samples.json").read_text())[0]["prompt"] == "Every effort moves you"
    assert (path / "models/pretrain/model.safetensors").is_file()
    assert len((path / "data/spam/test.csv").read_text().splitlines()) == 301
    confusion = json.loads((path / "metrics/curves/finetune_spam_confusion.json").read_text())
    assert len(confusion) == 300 and {"actual", "predicted"} == set(confusion[0])
    responses = json.loads((path / "data/instruct/responses.json").read_text())
    assert len(responses) == 110 and all("model_response" in r for r in responses)
    dpo = json.loads((path / "data/dpo/responses.json").read_text())
    assert 50 < len(dpo) <= 110 and all("policy_response" in r and "reference_response" in r for r in dpo)
    assert m["report"] == {"stages_reported": 6, "figures": 8}
    assert "not run" not in (path / "reports/report.md").read_text()
    assert len(list((path / "reports/figures").glob("*.png"))) == 8 and (path / "reports/report.html").is_file()


def test_metrics_are_clean_json_without_timings(repo):
    path, _ = repo
    for file in (path / "metrics").glob("*.json"):
        text = file.read_text()
        assert not any(c in text for c in ("NaN", "Infinity")), file.name  # strict JSON only
        json.loads(text)
        assert "seconds" not in text and "per_sec" not in text, file.name
    for stage in ("pretrain", "finetune_spam", "finetune_instruct", "finetune_dpo"):
        assert json.loads((path / f"timings/{stage}.json").read_text())["train_seconds"] > 0
    assert "seconds" not in (path / "models/pretrain/config.json").read_text()


def test_the_ci_profile_learns_and_passes_its_gate(repo):
    path, env = repo
    m = metrics(path)
    assert m["pretrain"]["val"]["loss"] <= 10.82 - 2  # ln(50257): what an untrained model scores
    assert m["finetune_spam"]["test"]["accuracy"] >= 0.85
    assert m["finetune_instruct"]["test"]["response_loss"] is not None
    held_out = m["finetune_dpo"]["test"]["after"]  # DPO on held-out pairs: the chosen answer pulls ahead
    assert held_out["reward_margin"] > 0 and held_out["preference_accuracy"] > 0.5
    out = gate(path, env)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].startswith("OK:"), out.stdout
    committed = ROOT / "ci/baseline/replicate-0"  # ci/run_profile.py's replicate 0: the same bits here
    assert all(
        json.loads((committed / f"{stage}.json").read_text()) == m[stage] for stage in STAGES if stage != "report"
    )


def run_queue(path, env, jobs: int, timeout: float = 900) -> str:
    """`dvc queue start -j JOBS`, then wait until nothing is queued or running; `dvc queue status`'s text."""
    import time

    sh(["dvc", "queue", "start", "-j", str(jobs)], path, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sh(["dvc", "queue", "status"], path, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    return status


def test_replicates_are_one_param_away_and_repeat_bit_for_bit(repo):
    """DVC's grid syntax queues the profile under two more seeds; every stage that draws moves with the
    replicate, and replicate 1 run here is bit for bit replicate 1 as ci/run_profile.py committed it."""
    from llm.pipeline.compare import experiment_members, group_experiments

    path, env = repo
    base = metrics(path)
    try:
        sh(["dvc", "exp", "run", "--queue", "-S", "runtime.replicate=1,2"], path, env)
        status = run_queue(path, env, jobs=2)
        assert status.count("Success") == 2, status
        shown = json.loads(sh(["dvc", "exp", "show", "--json"], path, env).stdout)
        by_replicate = {}
        for rev in shown:
            for e in rev.get("experiments") or []:
                data = e["revs"][0]["data"]
                r = data["params"]["params.yaml"]["data"]["runtime"]["replicate"]
                by_replicate[r] = {f: v["data"] for f, v in data["metrics"].items()}
        assert sorted(by_replicate) == [1, 2]
        for r, m in by_replicate.items():
            moved = {
                "pretrain": m["metrics/pretrain.json"]["val"]["loss"] != base["pretrain"]["val"]["loss"],
                "eval": m["metrics/eval.json"]["val"]["loss"] != base["eval"]["val"]["loss"],
                "finetune_spam": m["metrics/finetune_spam.json"]["val"]["loss"] != base["finetune_spam"]["val"]["loss"],
                "finetune_instruct": m["metrics/finetune_instruct.json"]["val"]["loss"]
                != base["finetune_instruct"]["val"]["loss"],
                "finetune_dpo": m["metrics/finetune_dpo.json"]["val"]["after"]["loss"]
                != base["finetune_dpo"]["val"]["after"]["loss"],
            }
            assert all(moved.values()), (r, moved)
        assert by_replicate[1] != by_replicate[2]
        committed = ROOT / "ci/baseline/replicate-1"
        for stage in ("pretrain", "eval", "finetune_spam", "finetune_instruct", "finetune_dpo"):
            assert by_replicate[1][f"metrics/{stage}.json"] == json.loads((committed / f"{stage}.json").read_text())
        reference, others = group_experiments(experiment_members(shown), ["train.lr"])
        assert len(reference.members) == 3 and not others  # the commit (replicate 0) and both replicates
    finally:
        sh(["dvc", "queue", "stop"], path, env, ok=False)
        sh(["git", "checkout", "-q", "--", "."], path, env)
        sh(["dvc", "checkout", "-q", "-f"], path, env)


def test_nothing_to_do_then_a_forced_rerun_changes_nothing_downstream(repo):
    path, env = repo
    assert "Running stage" not in sh(["dvc", "repro"], path, env).stdout
    before = metrics(path)
    sh(["dvc", "repro", "-f", "-s", "pretrain"], path, env)
    status = sh(["dvc", "status"], path, env).stdout
    assert "Data and pipelines are up to date" in status, status
    assert metrics(path) == before


def test_bad_param_stops_the_stage_with_one_line(repo):
    path, env = repo
    params = path / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("train_ratio: 0.9", "train_ratio: 1.5"))
        out = sh([sys.executable, "-m", "stages.prepare_text"], path, env, ok=False)
        assert out.returncode == 2
        assert out.stderr.strip() == "prepare_text: error: params.yaml: data.train_ratio must be < 1, got 1.5"
    finally:
        params.write_text(original)


def test_experiment_then_the_run_cache_restores_a_parameter_set_run_before(repo):
    """lr x10 is a deliberate regression: the gate fails. Back to the profile's lr, nothing trains."""
    path, env = repo
    baseline = metrics(path)
    lr = yaml.safe_load(profiled_params())["train"]["lr"]  # the profile may set its own
    sh(["dvc", "exp", "run", "-n", "lr-x10", "-S", f"train.lr={lr * 10}"], path, env)
    assert metrics(path)["pretrain"]["val"]["loss"] != baseline["pretrain"]["val"]["loss"]
    out = gate(path, env)
    assert out.returncode == 1 and "REGRESSED" in out.stdout, out.stdout

    out = sh(["dvc", "exp", "run", "-n", "lr-back", "-S", f"train.lr={lr}"], path, env).stdout
    assert "Running stage" not in out, out
    for stage in ("pretrain", "eval", "finetune_spam", "finetune_instruct", "finetune_dpo", "report"):
        assert f"Stage '{stage}' is cached - skipping run" in out, stage
    assert metrics(path) == baseline
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], path, env).stdout)
    params = [rev["data"].get("params") or {} for rev in shown if rev.get("data")]
    assert params and all(set(p) == {"params.yaml"} and "sources" not in p["params.yaml"]["data"] for p in params)
    sh(["git", "checkout", "-q", "--", "."], path, env)
    sh(["dvc", "checkout", "-q"], path, env)


def test_push_then_pull_in_a_fresh_clone_reruns_nothing(repo, tmp_path):
    """The committed default remote is a folder beside the checkout: push, clone, pull, done."""
    path, env = repo
    sh(["dvc", "push"], path, env)
    clone = path.parent / "clone"
    sh(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    sh(["dvc", "pull"], clone, env)
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], clone, env).stdout
    assert "Running stage" not in sh(["dvc", "repro"], clone, env).stdout
    assert (clone / "models/pretrain/model.safetensors").read_bytes() == (
        path / "models/pretrain/model.safetensors"
    ).read_bytes()


def test_a_queued_experiment_runs_the_code_it_was_queued_with(repo):
    """Queue a run with a broken attention mask, revert the workspace, run the queue: the queued
    code ran (its metrics show the break) and the CI gate catches it."""
    path, env = repo
    model = path / "llm/model.py"
    original = model.read_text()
    broken = original.replace("dropout_p=dropout_p, is_causal=True)", "dropout_p=dropout_p, is_causal=False)")
    assert broken != original
    model.write_text(broken)
    sh(["dvc", "exp", "run", "--queue", "-n", "no-mask"], path, env)
    model.write_text(original)
    sh(["dvc", "exp", "run", "--run-all"], path, env)  # exits 0 even when a task fails: check below
    assert model.read_text() == original
    sh(["dvc", "exp", "apply", "no-mask"], path, env)
    assert model.read_text() == broken  # what ran is what was queued
    try:
        out = gate(path, env)
        assert out.returncode == 1 and "REGRESSED" in out.stdout, out.stdout
    finally:
        sh(["git", "checkout", "-q", "--", "."], path, env)
        sh(["dvc", "checkout", "-q"], path, env)


def test_pretrain_and_eval_start_from_gpt2_weights(repo, tmp_path):
    """model.init: a GPT-2 checkpoint; train.num_epochs 0 measures it and passes it on unchanged."""
    transformers = pytest.importorskip("transformers")
    import torch

    path, env = repo
    torch.manual_seed(0)
    n_positions = PROFILE["model"].get("context_length") or 32  # so that emb_dim is the first conflict
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=12, n_head=3, n_layer=1)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path / "gpt2")
    params = path / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    raw["train"]["num_epochs"] = 0
    try:
        raw["model"]["init"] = str(tmp_path / "gpt2")
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        out = sh([sys.executable, "-m", "stages.pretrain"], path, env, ok=False)
        assert out.returncode == 2, out.stderr  # the profile's model.emb_dim disagrees with the weights' 12
        assert out.stderr.strip().startswith("pretrain: error: model.emb_dim = ")

        raw["model"].update({k: None for k in ("emb_dim", "n_heads", "n_layers", "context_length")})
        raw["train"].update({"max_length": 32, "stride": 32})
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        for stage in ("pretrain", "eval"):
            sh([sys.executable, "-m", f"stages.{stage}"], path, env)
        m = json.loads((path / "metrics/pretrain.json").read_text())
        assert m["steps"] == 0 and m["tokens_seen"] == 0 and m["train"]["loss"] > 0
        from llm.checkpoint import load_checkpoint

        model = load_checkpoint(path / "models/pretrain")
        ids = torch.randint(0, 50257, (1, 32))
        with torch.no_grad():
            assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4
        assert json.loads((path / "data/eval/samples.json").read_text())[0]["model"] == "pretrain"
    finally:
        params.write_text(original)
        sh(["dvc", "checkout", "-q", "-f"], path, env)


def test_two_nodes_then_dvc_commit_as_the_docs_say(repo):
    """docs/training.md's multi-node recipe on one machine: two torchrun agents (node ranks 0 and 1, one
    process each) on 127.0.0.1, then `dvc commit -f pretrain`: the stage is up to date, its metrics
    say 2 processes, and the downstream stages see the new model."""
    import re
    import socket

    path, env = repo
    page = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"<!-- multinode:begin -->\n```sh\n(.*?)```\n<!-- multinode:end -->", page, re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]
    launch, commit = lines
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = launch.replace("NODE0", "127.0.0.1").replace("--master-port 29500", f"--master-port {port}")
    launch = launch.replace("--nproc-per-node 8", "--nproc-per-node 1").split()
    assert launch[0] == "torchrun" and "--node-rank" in launch
    node_env = {**env, "OMP_NUM_THREADS": "1"}
    try:
        nodes = []
        for rank in ("0", "1"):
            args = list(launch)
            args[args.index("--node-rank") + 1] = rank
            nodes.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=path, env=node_env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)[-4000:]
        m = json.loads((path / "metrics/pretrain.json").read_text())
        assert m["processes"] == 2 and m["global_batch"] == 2 * PROFILE["train"]["batch_size"]
        assert "train loss" in outputs[0] and "train loss" not in outputs[1]  # rank 0 reports and writes
        sh(commit.split(), path, env)
        status = sh(["dvc", "status", "pretrain"], path, env).stdout
        assert "changed" not in status, status
        assert "eval" in sh(["dvc", "status"], path, env).stdout  # downstream: a new model to evaluate
    finally:
        sh(["git", "checkout", "-q", "--", "."], path, env)
        sh(["dvc", "checkout", "-q", "-f"], path, env)


def test_a_sweep_two_at_a_time_on_one_thread_each(repo):
    """docs/experiments.md's sweep: queued with runtime.threads=1, run by `dvc queue start -j 2`; both
    succeed, every stage that runs a model used one thread, the metrics follow the params, and the page's
    comparison commands read the two experiments."""
    path, env = repo
    lr = yaml.safe_load(profiled_params())["finetune_spam"]["lr"]
    names = {"sweep-a": lr / 2, "sweep-b": lr * 2}
    try:
        for name, value in names.items():
            sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"finetune_spam.lr={value}",
                "-S", "runtime.threads=1"], path, env)  # fmt: skip
        status = run_queue(path, env, jobs=2)
        rows = {line.split()[1]: line.split()[-1] for line in status.splitlines() if len(line.split()) >= 4}
        assert [rows.get(name) for name in names] == ["Success", "Success"], status
        shown = json.loads(sh(["dvc", "exp", "show", "--json"], path, env).stdout)
        experiments = {e["name"]: e for rev in shown for e in (rev.get("experiments") or [])}
        loss = {}
        for name, value in names.items():
            data = experiments[name]["revs"][0]["data"]
            params = data["params"]["params.yaml"]["data"]
            assert params["runtime"]["threads"] == 1 and params["finetune_spam"]["lr"] == value
            loss[name] = data["metrics"]["metrics/finetune_spam.json"]["data"]["train"]["loss"]
            sh(["dvc", "exp", "apply", name], path, env)
            for stage in ("pretrain", "finetune_spam", "finetune_instruct"):
                assert json.loads((path / f"timings/{stage}.json").read_text())["threads"] == 1, stage
        assert loss["sweep-a"] != loss["sweep-b"]
        plots = sh(["dvc", "plots", "diff", "sweep-a", "sweep-b", "--json"], path, env).stdout
        assert "sweep-a" in plots and "sweep-b" in plots
        out = sh([str(BIN / "llm"), "compare", "--baseline", "sweep-a", "--target", "sweep-b"], path, env, ok=False)
        assert out.returncode in (0, 1) and "finetune_spam" in out.stdout, out.stdout + out.stderr
    finally:
        sh(["dvc", "queue", "stop"], path, env, ok=False)
        sh(["git", "checkout", "-q", "--", "."], path, env)
        sh(["dvc", "checkout", "-q", "-f"], path, env)


def test_an_experiment_with_two_processes_is_recorded_like_any_other(repo):
    """`dvc exp run -S finetune_spam.nproc_per_node=2`: the stage relaunches itself through torchrun inside
    DVC's run, and the experiment's metrics say 2 processes and the global batch."""
    path, env = repo
    try:
        sh(["dvc", "exp", "run", "-n", "spam-ddp", "-S", "finetune_spam.nproc_per_node=2"], path, env)
        m = json.loads((path / "metrics/finetune_spam.json").read_text())
        assert m["processes"] == 2 and m["global_batch"] == 2 * PROFILE["finetune_spam"]["batch_size"]
        assert m["test"]["accuracy"] >= 0.8
        shown = json.loads(sh(["dvc", "exp", "show", "--json"], path, env).stdout)
        experiments = {e["name"]: e for rev in shown for e in (rev.get("experiments") or [])}
        data = experiments["spam-ddp"]["revs"][0]["data"]
        assert data["metrics"]["metrics/finetune_spam.json"]["data"]["processes"] == 2
        assert data["params"]["params.yaml"]["data"]["finetune_spam"]["nproc_per_node"] == 2
    finally:
        sh(["git", "checkout", "-q", "--", "."], path, env)
        sh(["dvc", "checkout", "-q", "-f"], path, env)


def test_the_quick_profile_runs_the_whole_pipeline(repo):
    """docs/recipes.md: `python -m llm.pipeline.profiles quick --run` is one `dvc exp run` of every stage with
    the profile's values, recorded like any experiment's."""
    path, env = repo
    try:
        out = sh([sys.executable, "-m", "llm.pipeline.profiles", "quick", "--run", "--", "-n", "quick"], path, env)
        for stage in ("pretrain", "eval", "finetune_spam", "finetune_instruct", "finetune_dpo", "report"):
            assert f"Running stage '{stage}'" in out.stdout, stage  # runtime.threads 2: every model stage reruns
        assert "Data and pipelines are up to date" in sh(["dvc", "status"], path, env).stdout
        shown = json.loads(sh(["dvc", "exp", "show", "--json"], path, env).stdout)
        runs = [rev for rev in shown for exp in rev.get("experiments") or [] if exp.get("name") == "quick"]
        assert runs, shown
        params = yaml.safe_load((path / "params.yaml").read_text())
        quick = yaml.safe_load((ROOT / "profiles/quick.yaml").read_text())
        assert all(params[s][k] == v for s, values in quick.items() for k, v in values.items())
    finally:
        sh(["git", "checkout", "-q", "--", "."], path, env)
        sh(["dvc", "checkout", "-q"], path, env)


def test_the_shakespeare_profile_pretrains_on_tinyshakespeare(repo):
    """The Shakespeare profile's line, cut to a few steps (`-S train.max_steps=3` after it), runs pretraining
    on tinyshakespeare's tokens and evaluates the model: a later -S wins over the profile's."""
    path, env = repo
    args = ["shakespeare", "--run", "--", "eval", "-n", "bard", "-S", "train.max_steps=3", "-S", "train.eval_freq=1"]
    try:
        sh([sys.executable, "-m", "llm.pipeline.profiles", *args], path, env)
        prepared = json.loads((path / "metrics/prepare_text.json").read_text())
        assert prepared["train"]["tokens"] + prepared["val"]["tokens"] > 300_000, prepared  # 338,025 GPT-2 tokens
        pretrain = json.loads((path / "metrics/pretrain.json").read_text())
        assert pretrain["steps"] == 3 and pretrain["tokens_seen"] == 3 * 4 * 64  # the profile's batch of 4
        params = yaml.safe_load((path / "params.yaml").read_text())
        assert params["data"]["corpus"] == ["tinyshakespeare"] and params["train"]["precision"] == "bf16-mixed"
    finally:
        sh(["git", "checkout", "-q", "--", "."], path, env)
        sh(["dvc", "checkout", "-q"], path, env)
