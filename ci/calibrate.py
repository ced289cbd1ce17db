"""Calibrate the CI gate: how much the metrics move with the seed alone, and what the gate catches.

    python ci/calibrate.py run seed 0-15          # the CI profile, replicates 0..15 (runtime.replicate)
    python ci/calibrate.py run lr-x10 0-5         # a deliberate regression, 6 replicates
    python ci/calibrate.py run default 0-9        # the default profile (params.yaml as committed)
    python ci/calibrate.py analyze                # ci/calibration/README.md from what was run

`run` keeps each replicate's metrics in `ci/calibration/<condition>/replicate-<r>/` (small JSONs,
committed: the table is reproducible from them without rerunning) and skips replicates already
there. Every run uses one torch thread (`runtime.threads: 1`), two at a time on two cores, so its
bits do not depend on what else runs. The conditions:

- `seed`: the CI profile unchanged: its replicates differ only in their seeds.
- `lr-x10`: `train.lr` ten times the profile's (0.03).
- `half-epochs`: pretraining for 6 epochs instead of 12: a smaller real regression.
- `leaky-mask`: attention that sees the future (`is_causal=False` in llm/model.py's first pass).
- `default`: the default profile (no CI profile), for the spread a user's experiments see.

`analyze` estimates, by drawing replicate sets at random (disjoint sets of the `seed` pool for a
pure seed change), the gate's false-alarm rate under a pure seed change and its detection rate of
each regression, for the committed thresholds.yaml and the gate's statistics (`llm compare`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm.pipeline.compare import Gate, compare, load_gates, read_metrics_dir  # noqa: E402

OUT = ROOT / "ci" / "calibration"
CONDITIONS = {
    "seed": ("ci", []),
    "lr-x10": ("ci", ["train.lr=0.03"]),
    "half-epochs": ("ci", ["train.num_epochs=6"]),
    "leaky-mask": ("ci", []),
    "default": ("default", ["runtime.threads=1"]),
}
README = OUT / "README.md"
HEADER = """# The CI gate, calibrated

Written by `python ci/calibrate.py analyze` from the metrics of every replicate in this folder
(`<condition>/replicate-<r>/`, run by `python ci/calibrate.py run CONDITION FIRST-LAST`; see that
script's docstring for the conditions). The gate is `llm compare` with the committed
`thresholds.yaml`. Failure rates are the share of 2,000 random draws of replicate sets that fail the
gate: for a pure seed change, two disjoint sets of the `seed` pool (the CI profile unchanged); for a
regression, a set of the `seed` pool against a set of the regression's pool. Draws from pools this
small overlap, so read the rates to about ±3 points. docs/experiments.md explains the tables.

## Seed-to-seed spread of the gated metrics, and the regressions' means
"""
LEAK = ("ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)", "is_causal=False)")
PREVIOUS = {  # thresholds.yaml before replicates: fixed allowances, one run against one
    "metrics/pretrain.json": {"val.loss": Gate("higher", 0.02, True)},
    "metrics/eval.json": {"val.loss": Gate("higher", 0.02, True)},
    "metrics/finetune_spam.json": {"test.accuracy": Gate("lower", 0.01, False), "test.f1": Gate("lower", 0.01, False)},
    "metrics/finetune_instruct.json": {
        "val.loss": Gate("higher", 0.02, True),
        "test.response_loss": Gate("higher", 0.02, True),
        "test.rouge_l": Gate("lower", 0.02, False),
    },
}
DRAWS = 2000  # random replicate sets per estimate: a rate's standard error is at most 1.1 points
SIDE = 3  # new replicates, as ci/run_profile.py runs them
BASELINE = 10  # the committed baseline's replicates (ci/run_profile.py's BASELINE_REPLICATES)


def _run_profile():
    spec = importlib.util.spec_from_file_location("run_profile", ROOT / "ci" / "run_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replicates(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def run(condition: str, wanted: list[int], jobs: int) -> None:
    rp = _run_profile()
    kind, sets = CONDITIONS[condition]
    profile = yaml.safe_load(rp.PROFILE.read_text()) if kind == "ci" else {}
    todo = [r for r in wanted if not (OUT / condition / f"replicate-{r}").is_dir()]
    if not todo:
        print(f"{condition}: replicates {wanted[0]}-{wanted[-1]} already there")
        return
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    scratch = Path(tempfile.mkdtemp(prefix=f"llm-calibrate-{condition}-"))
    try:
        for start in range(0, len(todo), jobs):  # a batch at a time: each finished batch is kept
            batch = todo[start : start + jobs]
            works = []
            for r in batch:
                work = rp.make_workspace(scratch / f"replicate-{r}", profile, [*sets, f"runtime.replicate={r}"])
                if condition == "leaky-mask":
                    model = work / "llm" / "model.py"
                    text = model.read_text()
                    assert LEAK[0] in text, "llm/model.py no longer has the causal attention line to break"
                    model.write_text(text.replace(LEAK[0], LEAK[0].replace("is_causal=True)", LEAK[1])))
                works.append(work)
            rp.run_replicates(works, env, jobs, scratch / "logs")
            for r, work in zip(batch, works, strict=True):
                dest = OUT / condition / f"replicate-{r}"
                shutil.copytree(work / "metrics", dest, ignore=shutil.ignore_patterns("curves"))
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def pool(condition: str) -> list[dict]:
    dirs = sorted((OUT / condition).glob("replicate-*"), key=lambda p: int(p.name.split("-")[1]))
    return [read_metrics_dir(d) for d in dirs]


def gate_fails(olds: list[dict], news: list[dict], gates) -> tuple[bool, set[str]]:
    rows = compare(olds, news, gates)
    failed = {f"{r.file}:{r.name}" for r in rows if r.failed}
    return bool(failed), failed


def rate(draw, gates, rng: random.Random) -> tuple[float, dict[str, float]]:
    """The share of `DRAWS` random replicate sets (olds, news = draw(rng)) that fail the gate, and
    the share that fails on each metric."""
    fails, per = 0, {}
    for _ in range(DRAWS):
        failed, which = gate_fails(*draw(rng), gates)
        fails += failed
        for name in which:
            per[name] = per.get(name, 0) + 1
    return fails / DRAWS, {k: v / DRAWS for k, v in per.items()}


def spread_table(gates, conditions: list[str]) -> list[str]:
    lines = [
        "| metric | condition | n | mean | seed-to-seed sd | min | max |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for file, names in gates.items():
        for name in names:
            for condition in conditions:
                values = [m.get(file, {}).get(name) for m in pool(condition)]
                values = [v for v in values if v is not None]
                if len(values) < 2:
                    continue
                lines.append(
                    f"| `{file}:{name}` | {condition} | {len(values)} | {statistics.fmean(values):.4f} | "
                    f"{statistics.stdev(values):.4f} | {min(values):.4f} | {max(values):.4f} |"
                )
    return lines


def calibrated_gates(gates: dict, runs: list[dict]) -> dict:
    """The gates on the stages the calibration runs hold: a stage added after they were run (finetune_dpo)
    is not in them, and its gates would read as missing in every draw. Its allowance is then the spread of
    the CI baseline's replicates that hold it (thresholds.yaml says how many)."""
    held = {file for run in runs for file in run}
    return {file: names for file, names in gates.items() if file in held}


def analyze(seed: int = 0) -> str:
    """The spread table, then the gate's failure rates: a pure seed change (disjoint sets of the
    `seed` pool) and each regression (its pool against the `seed` pool), for the gate as CI runs it
    (the baseline's replicates against 3 new ones), for 3 against 3, and for one run against one (the
    fixed allowances alone, as before replicates)."""
    base = pool("seed")
    current = calibrated_gates(load_gates(ROOT / "thresholds.yaml"), base)
    present = [c for c in CONDITIONS if (OUT / c).is_dir() and pool(c)]
    n_base = min(BASELINE, len(base) - SIDE)
    lines = [
        "| comparison | runs (old vs new) | gate fails | fails by metric |",
        "| --- | :---: | ---: | --- |",
    ]

    def show(label: str, sides: str, result: tuple[float, dict[str, float]]) -> None:
        total, per = result
        detail = ", ".join(
            f"`{k.removeprefix('metrics/')}` {v:.1%}" for k, v in sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        lines.append(f"| {label} | {sides} | {total:.1%} | {detail or '-'} |")

    for n_old, n_new, gates, note in (
        (n_base, SIDE, current, ""),
        (SIDE, SIDE, current, ""),
        (1, 1, current, ""),
        (1, 1, PREVIOUS, " (the allowances before replicates)"),
    ):
        rng = random.Random(seed)
        sides = f"{n_old} vs {n_new}{note}"
        if len(base) >= n_old + n_new:

            def pure_seed(r, n_old=n_old, n_new=n_new):
                picked = r.sample(base, n_old + n_new)
                return _side(picked[:n_old]), _side(picked[n_old:])

            show("pure seed change (disjoint replicates of the CI profile)", sides, rate(pure_seed, gates, rng))
        for condition in ("lr-x10", "half-epochs", "leaky-mask"):
            other = pool(condition) if condition in present else []
            if len(other) >= n_new and len(base) >= n_old:

                def against(r, o=other, n_old=n_old, n_new=n_new):
                    return _side(r.sample(base, n_old)), _side(r.sample(o, n_new))

                show(f"`{condition}`", sides, rate(against, gates, rng))
    return "\n".join([*spread_table(current, present), "", "## The gate's failure rates", "", *lines])


def _side(runs: list[dict]) -> dict | list[dict]:
    """One run as one run (the allowances alone decide), several as replicates."""
    return runs[0] if len(runs) == 1 else runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("condition", choices=sorted(CONDITIONS))
    r.add_argument("replicates", help="FIRST-LAST, e.g. 0-15")
    r.add_argument("--jobs", type=int, default=2)
    sub.add_parser("analyze", help=f"print the tables and write them to {README.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.command == "run":
        run(args.condition, replicates(args.replicates), args.jobs)
    else:
        tables = analyze()
        README.write_text(HEADER + "\n" + tables + "\n", encoding="utf-8")
        print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
