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

from llm.pipeline.compare import compare, load_gates, read_metrics_dir  # noqa: E402

OUT = ROOT / "ci" / "calibration"
CONDITIONS = {
    "seed": ("ci", []),
    "lr-x10": ("ci", ["train.lr=0.03"]),
    "half-epochs": ("ci", ["train.num_epochs=6"]),
    "leaky-mask": ("ci", []),
    "default": ("default", ["runtime.threads=1"]),
}
LEAK = ("ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)", "is_causal=False)")
DRAWS = 2000  # random replicate sets per estimate: a rate's standard error is at most 1.1 points
SIDE = 3  # replicates per side, as ci/run_profile.py runs


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


def analyze(seed: int = 0) -> str:
    gates = load_gates(ROOT / "thresholds.yaml")
    rng = random.Random(seed)
    base = pool("seed")
    present = [c for c in CONDITIONS if (OUT / c).is_dir() and pool(c)]
    lines = ["| comparison (3 replicates per side) | gate fails | by metric |", "| --- | ---: | --- |"]

    def show(label: str, result: tuple[float, dict[str, float]]) -> None:
        total, per = result
        detail = ", ".join(f"`{k.split('/')[-1]}` {v:.0%}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {label} | {total:.1%} | {detail or '-'} |")

    if len(base) >= 2 * SIDE:

        def pure_seed(r):
            picked = r.sample(base, 2 * SIDE)
            return picked[:SIDE], picked[SIDE:]

        show("pure seed change: two disjoint sets of the `seed` pool", rate(pure_seed, gates, rng))
    for condition in ("lr-x10", "half-epochs", "leaky-mask"):
        other = pool(condition) if condition in present else []
        if len(other) >= SIDE and len(base) >= SIDE:

            def against(r, o=other):
                return r.sample(base, SIDE), r.sample(o, SIDE)

            show(f"`{condition}` against the `seed` pool", rate(against, gates, rng))
    return "\n".join([*spread_table(gates, [c for c in present]), "", *lines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("condition", choices=sorted(CONDITIONS))
    r.add_argument("replicates", help="FIRST-LAST, e.g. 0-15")
    r.add_argument("--jobs", type=int, default=2)
    sub.add_parser("analyze")
    args = parser.parse_args()
    if args.command == "run":
        run(args.condition, replicates(args.replicates), args.jobs)
    else:
        print(analyze())
    return 0


if __name__ == "__main__":
    sys.exit(main())
