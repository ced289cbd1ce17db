"""The pull-request comment of the CI profile (`llm.pipeline.prcomment`), and `ci/run_profile.py`'s
parts that feed it: its params, its base, its `dvc params diff`."""

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from llm.cli import main
from llm.errors import LLMError
from llm.files import write_csv, write_json
from llm.pipeline.compare import Gate
from llm.pipeline.prcomment import COMMENT, LOSS_CURVES, SUMMARY, curve_file, summary_markdown, write_comment
from tests.conftest import ROOT

GATES = {
    "metrics/pretrain.json": {"val.loss": Gate("higher", 0.02, True)},
    "metrics/finetune_spam.json": {"test.accuracy": Gate("lower", 0.01, False)},
}
PARAMS_DIFF = "| Path | Param | main | abc1234 |\n|---|---|---|---|\n| params.yaml | train.lr | 0.003 | 0.03 |"


def metrics_dir(path, loss, accuracy=0.95, steps=90, curves=True):
    """A stand-in for a run's `metrics/`: two stages' metrics and, with `curves`, their loss curves."""
    write_json(path / "pretrain.json", {"val": {"loss": loss}, "steps": steps})
    write_json(path / "finetune_spam.json", {"test": {"accuracy": accuracy}})
    if curves:
        rows = [{"tokens_seen": 512 * i, "train_loss": loss + 4 - i, "val_loss": loss + 4.5 - i} for i in range(5)]
        write_csv(curve_file(path, "pretrain_loss"), rows)
        rows = [{"examples_seen": 16 * i, "train_loss": 0.7 - 0.1 * i, "val_loss": 0.8 - 0.1 * i} for i in range(5)]
        write_csv(curve_file(path, "finetune_spam_loss"), rows)
    return path


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def test_a_regression_comment_gives_the_verdict_first_then_tables_params_and_curves(tmp_path):
    base = metrics_dir(tmp_path / "base", loss=6.0)
    head = metrics_dir(tmp_path / "head", loss=6.6, steps=91)  # +10 % pretrain val.loss
    path = write_comment(tmp_path / "out", base, head, GATES, PARAMS_DIFF, "main", "abc1234")
    md = path.read_text()
    lines = [line for line in md.splitlines() if line]
    assert lines[0] == "## ❌ CI profile: gate failed"
    assert lines[1] == (
        "**FAIL: 1 of 2 gated metrics regressed or missing: metrics/pretrain.json:val.loss (regressed)**"
    )
    order = [md.index(s) for s in ("### Gated metrics", "<details>", "### Params", "### Loss curves")]
    assert order == sorted(order)
    assert "| metric | main | abc1234 | change | gate | status |" in md
    assert "| metrics/pretrain.json:val.loss | 6 | 6.6 | +0.6 (+10.00%) | rise <= 2% | REGRESSED |" in md
    assert "| metrics/finetune_spam.json:test.accuracy | 0.95 | 0.95 | +0 (+0.00%) | fall <= 0.01 | unchanged |" in md
    gated, folded = md.split("<details>")
    assert "pretrain.json:steps" not in gated and "| metrics/pretrain.json:steps | 90 | 91 |" in folded
    assert "<summary>1 ungated metrics changed</summary>" in folded
    assert "| params.yaml | train.lr | 0.003 | 0.03 |" in md
    # the two loss curves both sides have, one PNG each, base and head side by side
    assert md.count("![") == 2
    for plot_id in ("pretrain_loss", "finetune_spam_loss"):
        assert f"]({plot_id}.png)" in md
        width, height = png_size(tmp_path / "out" / f"{plot_id}.png")
        assert width > 2 * height  # two panels in a row
    assert not (tmp_path / "out" / "finetune_instruct_loss.png").exists()  # neither side has that curve


def test_a_passing_comment_and_no_params_changed(tmp_path):
    base = metrics_dir(tmp_path / "base", loss=6.0)
    head = metrics_dir(tmp_path / "head", loss=6.05)  # +0.8 %: within 2 %
    header_only = "| Path | Param | main | head |\n|---|---|---|---|\n"  # `dvc params diff --md`, no change
    for diff in ("", header_only):
        md = write_comment(tmp_path / "out", base, head, GATES, diff, "main", "head").read_text()
        assert md.startswith("## ✅ CI profile: gate passed\n\n**OK: 2 gated metrics within their thresholds**\n")
        assert "No params changed (`dvc params diff`)." in md and "| Path |" not in md
        assert "<details>" not in md  # no ungated metric changed


def test_the_verdict_is_the_gates_when_the_change_updates_the_baseline(tmp_path):
    """The gate checks the head against its own, updated ci/baseline; the tables compare with the base."""
    base = metrics_dir(tmp_path / "base", loss=6.0)
    updated = metrics_dir(tmp_path / "updated", loss=6.6)
    head = metrics_dir(tmp_path / "head", loss=6.6)
    md = write_comment(tmp_path / "out", base, head, GATES, "", "main", "head", gate_base=updated).read_text()
    assert md.startswith("## ✅ CI profile: gate passed\n\n**OK: 2 gated metrics within their thresholds**")
    assert "This change updates `ci/baseline/`" in md
    assert "| metrics/pretrain.json:val.loss | 6 | 6.6 | +0.6 (+10.00%) | rise <= 2% | REGRESSED |" in md
    same = write_comment(tmp_path / "out2", base, head, GATES, "", gate_base=base).read_text()
    assert same.startswith("## ❌") and "updates `ci/baseline/`" not in same


def test_a_side_without_curves_gets_an_empty_panel(tmp_path):
    base = metrics_dir(tmp_path / "base", loss=6.0, curves=False)  # a baseline committed before the curves
    head = metrics_dir(tmp_path / "head", loss=6.0)
    md = write_comment(tmp_path / "out", base, head, GATES, "", "main", "head").read_text()
    assert "![Pretraining loss](pretrain_loss.png)" in md
    width, height = png_size(tmp_path / "out" / "pretrain_loss.png")
    assert width > 2 * height
    neither = write_comment(tmp_path / "out2", base, base, GATES, "").read_text()
    assert "![" not in neither and "### Loss curves" not in neither


def test_the_job_summary_names_the_images_instead_of_showing_them(tmp_path):
    base = metrics_dir(tmp_path / "base", loss=6.0)
    write_comment(tmp_path / "out", base, base, GATES, "", "main", "head", where="the `pr-comment` artifact")
    summary = (tmp_path / "out" / SUMMARY).read_text()
    assert "![" not in summary
    assert "*Pretraining loss: `pretrain_loss.png` in the `pr-comment` artifact*" in summary
    assert summary_markdown("a ![t](x.png) b") == "a *t: `x.png` in the run's artifact* b"


def test_loss_curves_are_the_loss_plots_of_dvc_yaml():
    from llm.pipeline.validate import read_yaml

    plots = {next(iter(p)): p[next(iter(p))] for p in read_yaml(ROOT / "dvc.yaml")["plots"]}
    for plot_id in LOSS_CURVES:
        assert plots[plot_id]["y"] == {curve_file("metrics", plot_id).as_posix(): ["train_loss", "val_loss"]}


def test_cli_compare_writes_the_comment(tmp_path, capsys):
    base = metrics_dir(tmp_path / "base", loss=6.0)
    head = metrics_dir(tmp_path / "head", loss=6.6)
    (tmp_path / "t.yaml").write_text("metrics/pretrain.json:\n  val.loss: {worse: higher, max_change: 2%}\n")
    (tmp_path / "params.md").write_text(PARAMS_DIFF)
    args = ["compare", "--old", str(base), "--new", str(head), "--thresholds", str(tmp_path / "t.yaml")]
    assert main([*args, "--comment", str(tmp_path / "out"), "--params-diff", str(tmp_path / "params.md")]) == 1
    md = (tmp_path / "out" / COMMENT).read_text()
    assert md.startswith("## ❌ CI profile: gate failed") and "| params.yaml | train.lr | 0.003 | 0.03 |" in md
    assert (tmp_path / "out" / "pretrain_loss.png").is_file()
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith("FAIL: 1 of 1 gated metrics regressed or missing: metrics/pretrain.json:val.loss (regressed)")
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--comment", "OUT"], "--comment needs --old and --new: two metrics directories, with their curves/"),
        (["--old", "B", "--new", "H", "--params-diff", "P"], "--params-diff needs --comment DIR"),
        (["--old", "B", "--new", "H", "--comment", "FILE"], "--comment FILE is a file: give a directory"),
        (["--old", "B", "--new", "H", "--comment", "OUT", "--params-diff", "NONE"], "cannot read --params-diff"),
    ],
)
def test_cli_comment_bad_input_is_one_line(tmp_path, capsys, extra, message):
    metrics_dir(tmp_path / "B", loss=6.0)
    metrics_dir(tmp_path / "H", loss=6.0)
    (tmp_path / "FILE").write_text("")
    names = {"B", "H", "OUT", "P", "FILE", "NONE"}
    argv = ["compare", *[str(tmp_path / a) if a in names else a for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("FILE", str(tmp_path / "FILE")) in err
    assert not (tmp_path / "OUT").exists()


# ci/run_profile.py: the params it runs, the base it compares with, the params diff it shows


def _run_profile():
    spec = importlib.util.spec_from_file_location("run_profile", ROOT / "ci" / "run_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_set_applies_after_the_profile_and_refuses_unknown_keys():
    rp = _run_profile()
    params = {"train": {"lr": 0.0004, "batch_size": 2}, "model": {"n_layers": 12}}
    out = rp.with_profile(params, {"train": {"lr": 0.003}}, ["train.lr=3.0e-2", "model.n_layers=4"])
    assert out == {"train": {"lr": 0.03, "batch_size": 2}, "model": {"n_layers": 4}}  # YAML 1.2: a number
    for bad, message in [
        ("train.lrr=1", "params.yaml has no train.lrr"),
        ("optim.lr=1", "params.yaml has no optim"),
        ("lr=1", "give section.key=value"),
        ("train.lr", "give section.key=value"),
        ("train.lr=[1", "the value is not YAML"),
    ]:
        with pytest.raises(LLMError, match=message):
            rp.with_profile(params, {}, [bad])


def test_base_side_reads_a_revisions_profile_params_and_baseline(tmp_path):
    rp = _run_profile()
    files, metrics = rp.base_side("HEAD", tmp_path / "base")
    assert set(files) == {"params.yaml", "dvc.yaml"}
    from llm.pipeline.validate import parse_yaml

    profile = parse_yaml(
        subprocess.run(
            ["git", "show", "HEAD:ci/profile.yaml"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    )
    assert parse_yaml(files["params.yaml"])["train"]["lr"] == profile["train"]["lr"]  # the profile applied
    committed = subprocess.run(
        ["git", "show", "HEAD:ci/baseline/replicate-1/pretrain.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [m.name for m in metrics[:2]] == ["replicate-0", "replicate-1"] and len(metrics) == len(rp.baseline_dirs())
    assert json.loads((metrics[1] / "pretrain.json").read_text()) == json.loads(committed)
    for rev, message in [("no-such-rev", "--base no-such-rev: cannot read ci/profile.yaml"), ("-x", "must not")]:
        with pytest.raises(LLMError, match=message):
            rp.base_side(rev, tmp_path / "other")


def test_the_scratch_copys_params_diff_is_the_change_from_base_to_run(tmp_path):
    """make_workspace commits the base's profile params first, then the run's (profile, then -S):
    `dvc params diff` between them names exactly the -S change, its columns named base and head."""
    rp = _run_profile()
    profile = rp.yaml.safe_load(rp.PROFILE.read_text())
    files, _ = rp.base_side(None, tmp_path / "unused")
    work = rp.make_workspace(tmp_path / "project", profile, ["train.lr=0.03"], files)
    assert rp._git(work, "rev-list", "--count", "HEAD").strip() == "2"
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    lines = rp.params_diff(work, env, "main", "abc1234").splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["Path", "Param", "main", "abc1234"]
    assert cells[2:] == [["params.yaml", "train.lr", str(profile["train"]["lr"]), "0.03"]]


def test_the_docs_example_is_what_the_code_writes_from_its_inputs(tmp_path):
    """docs/pr-comment holds a real run's inputs (base/ and head/, one metrics directory per replicate
    with its curves, and the params diff) and the comment written from them; docs/experiments.md
    shows that comment."""
    from llm.pipeline.compare import load_gates
    from tests.test_stats import example_gates  # the gates of the stages its runs hold (made before DPO)

    example = ROOT / "docs" / "pr-comment"
    committed = (example / COMMENT).read_text()
    footer = committed.rsplit("<sub>", 1)[1].split("</sub>", 1)[0]
    sides = {
        side: sorted((example / side).glob("replicate-*"), key=lambda p: int(p.name[10:])) for side in ("base", "head")
    }
    assert len(sides["base"]) == 10 and len(sides["head"]) == 3
    written = write_comment(
        tmp_path / "out",
        sides["base"],
        sides["head"],
        {file: gates for file, gates in load_gates(ROOT / "thresholds.yaml").items() if file in example_gates()},
        (example / "params-diff.md").read_text(),
        base_label="main",
        head_label="lr-x10",
        footer=footer,
    ).read_text()
    assert written == committed
    assert "(n=10)" in committed and "(n=3)" in committed and "REGRESSED: worse, p" in committed
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(p.name for p in example.glob("*.png")) and len(pngs) == 3
    doc = (ROOT / "docs" / "experiments.md").read_text()
    shown = doc.split("<!-- pr-comment example", 1)[1].split("-->\n", 1)[1].split("<!-- end of", 1)[0]
    unquoted = "\n".join(line.removeprefix(">").removeprefix(" ") for line in shown.strip().splitlines())
    assert unquoted == committed.replace("](", "](pr-comment/").strip()  # quoted: its headings stay its own


def test_baseline_dirs_are_the_replicates_in_order_or_the_single_metrics_of_an_older_baseline(tmp_path):
    rp = _run_profile()
    for r in (0, 1, 2, 10, 9):
        (tmp_path / "new" / f"replicate-{r}").mkdir(parents=True)
    (tmp_path / "new" / "replicate-x").mkdir()
    assert [p.name for p in rp.baseline_dirs(tmp_path / "new")] == [f"replicate-{r}" for r in (0, 1, 2, 9, 10)]
    (tmp_path / "old" / "metrics").mkdir(parents=True)
    assert rp.baseline_dirs(tmp_path / "old") == [tmp_path / "old" / "metrics"]
    with pytest.raises(LLMError, match="run ci/run_profile.py --update-baseline"):
        rp.baseline_dirs(tmp_path / "none")
    committed = rp.baseline_dirs()
    assert len(committed) == rp.BASELINE_REPLICATES and all(
        (d / "curves" / "pretrain.csv").is_file() for d in committed
    )


def test_replicates_share_the_cores_and_the_replicate_is_not_a_set_option(capsys, monkeypatch):
    rp = _run_profile()
    monkeypatch.setattr(rp.os, "cpu_count", lambda: 2)
    assert rp.default_jobs(3, 1) == 2 and rp.default_jobs(3, 2) == 1 and rp.default_jobs(1, 1) == 1
    profile = rp.yaml.safe_load(rp.PROFILE.read_text())
    assert profile["runtime"]["threads"] == 1  # the same bits however many replicates run at once
    for argv, message in [
        (["-S", "runtime.replicate=2"], "--replicates sets it"),
        (["--replicates", "0"], "must be at least 1"),
    ]:
        monkeypatch.setattr(sys, "argv", ["run_profile.py", *argv])
        with pytest.raises(SystemExit) as exc:
            rp.main()
        assert exc.value.code == 2 and message in capsys.readouterr().err
