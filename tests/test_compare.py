"""`llm compare`: a readable table of metric changes and a gate on regressions."""

import json
import math
import shlex

import pytest

from llm.cli import main
from llm.errors import ConfigError, LLMError
from llm.files import write_json
from llm.pipeline.compare import (
    Gate,
    compare,
    dvc_metrics_diff,
    flatten,
    from_dvc_diff,
    load_gates,
    read_metrics_dir,
    table,
    verdict,
)

GATES = {
    "metrics/pretrain.json": {"val_loss": Gate("higher", 0.02, True)},
    "metrics/finetune_spam.json": {"test_accuracy": Gate("lower", 0.01, False)},
}


def status(rows, name):
    return next(r.status for r in rows if r.name == name)


@pytest.mark.parametrize(
    ("new_loss", "new_acc", "expected", "fails"),
    [
        (4.0, 0.95, ("improved", "improved"), False),  # both better
        (5.09, 0.935, ("within", "within"), False),  # +1.8% and -0.5 points: inside the gates
        (5.2, 0.94, ("REGRESSED", "unchanged"), True),  # +4% loss
        (5.0, 0.92, ("unchanged", "REGRESSED"), True),  # -2 points accuracy
    ],
)
def test_gates(new_loss, new_acc, expected, fails):
    old = {"metrics/pretrain.json": {"val_loss": 5.0}, "metrics/finetune_spam.json": {"test_accuracy": 0.94}}
    new = {"metrics/pretrain.json": {"val_loss": new_loss}, "metrics/finetune_spam.json": {"test_accuracy": new_acc}}
    rows = compare(old, new, GATES)
    assert (status(rows, "val_loss"), status(rows, "test_accuracy")) == expected
    assert any(r.failed for r in rows) is fails
    assert verdict(rows).startswith("FAIL" if fails else "OK")


def test_missing_new_and_ungated_metrics():
    old = {
        "metrics/pretrain.json": {"val_loss": 5.0, "steps": 90.0},
        "metrics/finetune_spam.json": {"test_accuracy": 0.9},
    }
    new = {"metrics/pretrain.json": {"steps": 91.0, "tokens_per_sec": 300.0}}
    rows = compare(old, new, GATES)
    assert status(rows, "val_loss") == "MISSING" and status(rows, "test_accuracy") == "MISSING"
    assert status(rows, "steps") == "changed" and status(rows, "tokens_per_sec") == "new"
    assert "2 of 2 gated metrics regressed or missing" in verdict(rows)
    text = table(rows)
    assert "metrics/pretrain.json:steps" in text and "+1 (+1.11%)" in text
    md = table(rows, markdown=True)
    assert md.splitlines()[0] == "| metric | old | new | change | gate | status |"
    assert "| metrics/pretrain.json:val_loss | 5 | - | - | rise <= 2% | MISSING |" in md


def test_nan_metrics():
    nan = float("nan")
    gates = {
        "m.json": {"a": Gate("higher", 0.0, False), "b": Gate("higher", 0.0, False), "c": Gate("lower", 0.0, False)}
    }
    rows = compare({"m.json": {"a": nan, "b": 1.0, "c": nan}}, {"m.json": {"a": nan, "b": nan, "c": 0.5}}, gates)
    assert [r.status for r in rows] == ["unchanged", "REGRESSED", "improved"]
    assert "+nan" not in table(rows)  # no change is computed against nan


def test_flatten_and_dvc_diff():
    assert flatten({"a": 1, "b": {"c": 2.5, "d": "text"}, "e": True, "f": [1]}) == {"a": 1.0, "b.c": 2.5}
    assert flatten({"a": None, "b": {"c": None}}) == {"a": None, "b.c": None}  # null is kept, not dropped
    diff = {
        "metrics/eval.json": {
            "val_loss": {"old": 6.0, "new": 5.5, "diff": -0.5},
            "x": {"old": None, "new": 1},  # DVC: null or absent in the old revision
            "device": {"old": None, "new": "cpu"},  # text: not a metric here
        }
    }
    old, new = from_dvc_diff(diff)
    assert old == {"metrics/eval.json": {"val_loss": 6.0, "x": None}}
    assert new == {"metrics/eval.json": {"val_loss": 5.5, "x": 1.0}}
    assert status(compare(old, new), "x") == "new"


def test_null_metrics_fail_their_gates_and_show_as_null():
    gates = {"m.json": {name: Gate("higher", 0.0, False) for name in ("nulled", "absent", "both_null", "revived")}}
    old = {"m.json": {"nulled": 1.0, "absent": 1.0, "both_null": None, "revived": None, "free": 2.0, "still": None}}
    new = {"m.json": {"nulled": None, "both_null": None, "revived": 0.5, "free": None, "still": None}}
    rows = compare(old, new, gates)
    assert {r.name: r.status for r in rows} == {
        "absent": "MISSING",
        "both_null": "MISSING",  # a gate on a value that is null fails, never passes vacuously
        "free": "null",
        "nulled": "MISSING",
        "revived": "new",
        "still": "unchanged",
    }
    text = verdict(rows)
    assert text.startswith("FAIL: 3 of 4 gated metrics regressed or missing")
    assert "m.json:nulled (missing: null)" in text and "m.json:absent (missing: absent)" in text
    assert "m.json:both_null (missing: null)" in text
    md = table(rows, markdown=True)
    assert "| m.json:nulled | 1 | null | - | rise <= 0 | MISSING |" in md
    assert "| m.json:absent | 1 | - | - | rise <= 0 | MISSING |" in md
    assert "| m.json:revived | null | 0.5 | - | rise <= 0 | new |" in md


def test_read_metrics_dir_keeps_nulls(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "a.json").write_text('{"loss": null, "acc": 0.5, "nested": {"ppl": null}}')
    (tmp_path / "metrics" / "old.json").write_text('{"loss": NaN, "ppl": Infinity}')  # written before write_json
    metrics = read_metrics_dir(tmp_path / "metrics")
    assert metrics["metrics/a.json"] == {"loss": None, "acc": 0.5, "nested.ppl": None}
    assert math.isnan(metrics["metrics/old.json"]["loss"]) and metrics["metrics/old.json"]["ppl"] == math.inf


def test_thresholds_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        "metrics/a.json:\n  loss: {worse: higher, max_change: 2%}\n  acc: {worse: lower, max_change: 0.01}\n"
    )
    gates = load_gates(path)
    assert gates["metrics/a.json"]["loss"] == Gate("higher", 0.02, True)
    assert gates["metrics/a.json"]["acc"].allowed(0.9) == 0.01
    for bad, message in [
        ("metrics/a.json:\n  loss: {worse: up, max_change: 2%}\n", "loss.worse must be higher or lower"),
        ("metrics/a.json:\n  loss: {worse: higher, max_change: lots}\n", "max_change must be a number"),
        ("metrics/a.json:\n  loss: {worse: higher}\n", "exactly the keys worse and max_change"),
    ]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_gates(path)


def test_committed_thresholds_gate_existing_metrics():
    from tests.conftest import ROOT

    gates = load_gates(ROOT / "thresholds.yaml")
    for file, names in gates.items():
        committed = json.loads((ROOT / "ci" / "baseline" / "replicate-0" / file.split("/", 1)[1]).read_text())
        assert set(names) <= set(flatten(committed)), file  # nested keys joined with "."


def test_cli_on_two_directories(tmp_path, capsys):
    for side, loss in (("old", 5.0), ("new", 5.5)):
        (tmp_path / side / "metrics").mkdir(parents=True)
        (tmp_path / side / "metrics" / "pretrain.json").write_text(json.dumps({"val_loss": loss, "steps": 9}))
    (tmp_path / "t.yaml").write_text("metrics/pretrain.json:\n  val_loss: {worse: higher, max_change: 2%}\n")
    summary = tmp_path / "summary.md"
    args = ["compare", "--old", str(tmp_path / "old/metrics"), "--new", str(tmp_path / "new/metrics")]
    assert main([*args, "--thresholds", str(tmp_path / "t.yaml"), "--markdown", str(summary)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and out.strip().splitlines()[-1].startswith("FAIL: 1 of 1")
    assert (
        "| metrics/pretrain.json:val_loss | 5 | 5.5 | +0.5 (+10.00%) | rise <= 2% | REGRESSED |" in summary.read_text()
    )
    (tmp_path / "t.yaml").write_text("metrics/pretrain.json:\n  val_loss: {worse: higher, max_change: 20%}\n")
    assert main([*args, "--thresholds", str(tmp_path / "t.yaml")]) == 0
    assert main([*args, "--thresholds", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read thresholds" in capsys.readouterr().err


def test_cli_fails_when_a_gated_metric_became_null(tmp_path, capsys):
    from llm.files import write_json

    write_json(tmp_path / "old/metrics/pretrain.json", {"val_loss": 5.0})
    write_json(tmp_path / "new/metrics/pretrain.json", {"val_loss": float("nan")})
    (tmp_path / "t.yaml").write_text("metrics/pretrain.json:\n  val_loss: {worse: higher, max_change: 2%}\n")
    args = ["compare", "--old", str(tmp_path / "old/metrics"), "--new", str(tmp_path / "new/metrics")]
    assert main([*args, "--thresholds", str(tmp_path / "t.yaml")]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3].split() == ["metrics/pretrain.json:val_loss", "5", "null", "-", "rise", "<=", "2%", "MISSING"]
    assert out[-2].startswith("one run per side: no spread is known")
    assert out[-1] == "FAIL: 1 of 1 gated metrics regressed or missing: metrics/pretrain.json:val_loss (missing: null)"


def _fake_dvc(tmp_path, monkeypatch, stdout: str):
    """A stand-in `dvc` on PATH that records its arguments, prints `stdout`, and fails (exit 255)
    when its last argument is "bad"."""
    fake = tmp_path / "dvc"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {tmp_path / "args"}\n'
        "for last; do :; done\n"
        'if [ "$last" = "bad" ]; then echo "ERROR: unknown revision" >&2; echo "more detail" >&2; exit 255; fi\n'
        f"printf '%s\\n' {shlex.quote(stdout)}\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path / "args"


def test_dvc_metrics_diff_runs_dvc_and_reports_its_failure_in_one_line(tmp_path, monkeypatch, capsys):
    """The arguments it gets (revisions after "--"), its JSON, its failure's last line."""
    diff = {"metrics/pretrain.json": {"val.loss": {"old": 5.0, "new": 4.0, "diff": -1.0}}}
    args = _fake_dvc(tmp_path, monkeypatch, json.dumps(diff))
    assert dvc_metrics_diff("HEAD") == diff
    assert args.read_text() == "metrics diff --json --all -- HEAD\n"
    assert dvc_metrics_diff("main", "exp-1") == diff
    assert args.read_text() == "metrics diff --json --all -- main exp-1\n"
    with pytest.raises(LLMError, match="^metrics diff --json --all -- HEAD bad failed: more detail$"):
        dvc_metrics_diff("HEAD", "bad")
    assert main(["compare", "--baseline", "HEAD", "--target", "bad"]) == 2
    assert capsys.readouterr().err == "llm compare: error: metrics diff --json --all -- HEAD bad failed: more detail\n"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(LLMError, match="dvc is not on PATH"):
        dvc_metrics_diff("HEAD")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--baseline=--help"],
            "--baseline '--help': a revision or experiment name must not be empty or start with '-'",
        ),
        (["--baseline=-x"], "--baseline '-x': a revision"),
        (["--target=--all"], "--target '--all': a revision"),
        (["--baseline="], "--baseline '': a revision"),
    ],
)
def test_a_revision_that_reads_as_an_option_never_reaches_dvc(tmp_path, monkeypatch, capsys, argv, message):
    args = _fake_dvc(tmp_path, monkeypatch, "{}")
    assert main(["compare", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"llm compare: error: {message}") and err.count("\n") == 1
    assert not args.exists()  # dvc never ran
    with pytest.raises(LLMError, match="must not be empty or start with '-'"):
        dvc_metrics_diff("HEAD", "--help")


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("Usage: dvc metrics diff [-h] ...", "printed no JSON: Usage: dvc metrics diff [-h] ..."),
        ("", None),  # nothing: no metrics
        ("[1, 2]", "printed JSON that is not {file: {metric: change}}"),
        ('{"metrics/a.json": 3}', "printed JSON that is not {file: {metric: change}}"),
    ],
)
def test_dvc_output_that_is_not_a_metrics_diff_is_one_line(tmp_path, monkeypatch, capsys, stdout, message):
    _fake_dvc(tmp_path, monkeypatch, stdout)
    if message is None:
        assert dvc_metrics_diff("HEAD") == {}
        return
    assert main(["compare"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"llm compare: error: metrics diff --json --all -- HEAD {message}\n"


def test_two_metrics_directories_compare_file_by_file_whatever_their_names(tmp_path, capsys):
    """`run-a/` against `run-b/`: keyed `metrics/<stage>.json` as DVC and thresholds.yaml key them."""
    from tests.conftest import ROOT

    for side, loss in (("run-a", 5.0), ("run-b", 5.02)):  # +0.4%: within the committed 0.6%
        write_json(tmp_path / side / "pretrain.json", {"val": {"loss": loss}})
        write_json(tmp_path / side / "sub" / "x.json", {"n": 1})
    old = read_metrics_dir(tmp_path / "run-a")
    assert set(old) == {"metrics/pretrain.json", "metrics/sub/x.json"}
    assert read_metrics_dir(tmp_path / "run-a", prefix="") == {
        "pretrain.json": {"val.loss": 5.0},
        "sub/x.json": {"n": 1},
    }
    gates = {"metrics/pretrain.json": load_gates(ROOT / "thresholds.yaml")["metrics/pretrain.json"]}
    rows = compare(old, read_metrics_dir(tmp_path / "run-b"), gates)
    assert status(rows, "val.loss") == "within"  # compared, not MISSING
    thresholds = tmp_path / "t.yaml"
    thresholds.write_text("metrics/pretrain.json:\n  val.loss: {worse: higher, max_change: 2%}\n")
    args = [
        "compare",
        "--old",
        str(tmp_path / "run-a"),
        "--new",
        str(tmp_path / "run-b"),
        "--thresholds",
        str(thresholds),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "metrics/pretrain.json:val.loss" in out and out.strip().endswith(
        "OK: 1 gated metrics within their thresholds"
    )


def test_finetune_dpos_nested_metrics_compare_and_gate_by_split_phase_and_name(tmp_path, monkeypatch, capsys):
    """metrics/finetune_dpo.json nests three levels (split, before/after, name): `dvc metrics diff` and
    `--old/--new` directories both name them `test.after.preference_accuracy`, as thresholds.yaml gates them."""
    from tests.conftest import dpo_metrics, scratch_repo

    sh, env = scratch_repo(tmp_path)
    old = dpo_metrics()
    write_json(tmp_path / "metrics" / "finetune_dpo.json", old)
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/finetune_dpo.json\n")
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    new = dpo_metrics()
    new["test"]["after"].update(preference_accuracy=0.5, reward_margin=0.25)  # from 0.625 and 0.125
    write_json(tmp_path / "metrics" / "finetune_dpo.json", new)
    write_json(tmp_path / "old" / "finetune_dpo.json", old)
    thresholds = tmp_path / "t.yaml"
    thresholds.write_text(
        "metrics/finetune_dpo.json:\n"
        "  test.after.preference_accuracy: {worse: lower, max_change: 0.05}\n"
        "  test.after.reward_margin: {worse: lower, max_change: 0.05}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    expected = [  # each row's cells, single-spaced
        "metrics/finetune_dpo.json:test.after.preference_accuracy 0.625 0.5 -0.125 (-20.00%) fall <= 0.05 REGRESSED",
        "metrics/finetune_dpo.json:test.after.reward_margin 0.125 0.25 +0.125 (+100.00%) fall <= 0.05 improved",
        "metrics/finetune_dpo.json:train.before.loss 0.693147 0.693147 +0 (+0.00%) unchanged",
    ]
    for args in (["--thresholds", str(thresholds)], ["--old", "old", "--new", "metrics", "--thresholds", "t.yaml"]):
        assert main(["compare", "--all", *args]) == 1
        lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
        assert [row for row in expected if row not in lines] == [], lines
        assert sum(line.startswith("metrics/finetune_dpo.json:") for line in lines) == 3 * 2 * 7 + 2 * 2 + 4
        assert lines[-1].startswith("FAIL: 1 of 2 gated metrics regressed or missing")
