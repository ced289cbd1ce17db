"""Run the whole pipeline on the CI profile in a scratch copy of the project, then gate its metrics.

    python ci/run_profile.py                     # 3 replicates, then `llm compare` against ci/baseline
    python ci/run_profile.py --update-baseline   # 10 replicates, then make their metrics the new baseline
    python ci/run_profile.py -S train.lr=0.03    # the profile with a param changed (repeatable)
    python ci/run_profile.py --replicates 1      # one run (no spread: the gates are fixed allowances)
    python ci/run_profile.py --base main --comment out/   # and the pull-request comment against main

Each replicate r (`runtime.replicate=r`: every seed of every stage moves) runs in its own copy,
`--jobs` at a time (the profile runs torch on one thread, `runtime.threads: 1`, so replicates on
separate cores do not fight, and every replicate gives the same bits however many run at once).
`ci/baseline/replicate-<r>/` holds the committed metrics of each replicate, and the gate is `llm
compare` of the two sets: a gated metric fails only when it got worse by more than its allowance
and by more than the seeds explain (Student's t-test, Holm across the gated metrics: see
llm/pipeline/stats.py and ci/calibration/README.md).

Each copy holds the tracked and untracked-but-not-ignored files (what a commit would hold), so
the workspace, its params.yaml and its DVC cache are never touched. Stages run through `dvc
repro` with the venv's tools first on PATH; each replicate's output goes to its own log, printed
when it fails. Exit status: that of `llm compare` against the committed ci/baseline (1 =
regression), or 2 with one line for bad options.

--comment DIR writes what CI posts on a pull request (`llm.pipeline.prcomment`): the verdict, the
gated metrics against the base's CI-profile metrics (ci/baseline/metrics at --base, default this
checkout's), `dvc params diff --md` between the base's profile params and this run's, and the
loss curves of both (replicate 0's). The scratch copy's git history is that diff: a first commit
with the base's params.yaml and dvc.yaml (the profile and no -S applied), then the run's files.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from llm.errors import LLMError, report_error
from llm.pipeline.compare import load_gates
from llm.pipeline.prcomment import write_comment
from llm.pipeline.profiles import with_profile
from llm.pipeline.validate import parse_yaml, read_yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "ci" / "profile.yaml"
BASELINE = ROOT / "ci" / "baseline"
REPLICATES = 3  # a run's: the fewest that give both sides a spread (ci/calibration/README.md: what it detects)
BASELINE_REPLICATES = 10  # the committed baseline's: run once, so it may hold more, for a better-known spread
REPLICATE_KEY = "runtime.replicate"


def replicate_dir(root: Path, r: int) -> Path:
    return root / f"replicate-{r}"


def baseline_dirs(root: Path = BASELINE) -> list[Path]:
    """The metrics directories of a baseline, replicate 0 first: `replicate-<r>/`, or the single
    `metrics/` that baselines before replicates hold."""
    found = sorted(
        (p for p in root.glob("replicate-*") if p.is_dir() and _metrics_dir_name(p.name)),
        key=lambda p: int(p.name[10:]),
    )
    if found:
        return found
    if (root / "metrics").is_dir():
        return [root / "metrics"]
    raise LLMError(f"{root} holds no replicate-<r>/ metrics directories: run ci/run_profile.py --update-baseline")


def project_files(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return [rel for rel in listed if rel and (root / rel).is_file() and not rel.startswith(("data/", "models/"))]


def _git(dest: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost"}
    env.update(GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@localhost")
    return subprocess.run(["git", *args], cwd=dest, env=env, check=True, capture_output=True, text=True).stdout


def make_workspace(dest: Path, profile: dict, sets: list[str] = (), base: dict[str, str] | None = None) -> Path:
    """A git repository at `dest` with the project's files, `profile` and then `sets` applied to
    params.yaml. `base` ({file: text}: the base's params.yaml with its profile, and its dvc.yaml)
    is committed first, so that `dvc params diff HEAD~1 HEAD` is the change from base to run."""
    dest.mkdir(parents=True, exist_ok=True)
    _git(dest, "init", "-q")
    if base:
        for rel, text in base.items():
            (dest / rel).write_text(text, encoding="utf-8")
        _git(dest, "add", "-A")
        _git(dest, "commit", "-qm", "base: the CI profile's params")
    for rel in project_files(ROOT):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    params = with_profile(read_yaml(dest / "params.yaml"), profile, sets)  # YAML 1.2, as DVC reads it
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(dest, "add", "-A")
    _git(dest, "commit", "-qm", "CI profile")
    return dest


def git_show(rev: str, rel: str) -> str:
    """A file of this repository at revision `rev`; an LLMError when it has none."""
    out = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise LLMError(f"--base {rev}: cannot read {rel}: {lines[-1] if lines else out.returncode}")
    return out.stdout


def base_side(rev: str | None, dest: Path) -> tuple[dict[str, str], list[Path]]:
    """What the comment compares against: ({file: text} of the base's profile params.yaml and its
    dvc.yaml, the base's baseline metrics directories, one per replicate). Without `rev`: this
    checkout's, before any -S. A base from before replicates has one directory, ci/baseline/metrics."""
    if rev is None:
        params = with_profile(read_yaml(ROOT / "params.yaml"), yaml.safe_load(PROFILE.read_text()))
        files = {"params.yaml": yaml.safe_dump(params, sort_keys=False), "dvc.yaml": (ROOT / "dvc.yaml").read_text()}
        return files, baseline_dirs()
    if rev.startswith("-") or not rev.strip():
        raise LLMError(f"--base {rev!r}: a revision must not be empty or start with '-'")
    profile = parse_yaml(git_show(rev, "ci/profile.yaml"))
    params = with_profile(parse_yaml(git_show(rev, "params.yaml")), profile)
    files = {"params.yaml": yaml.safe_dump(params, sort_keys=False), "dvc.yaml": git_show(rev, "dvc.yaml")}
    listed = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "--", "ci/baseline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    parts = [Path(rel).relative_to("ci/baseline").parts for rel in listed]
    kept = [(rel, p) for rel, p in zip(listed, parts, strict=True) if len(p) > 1 and _metrics_dir_name(p[0])]
    if not kept:
        raise LLMError(f"--base {rev}: it has no ci/baseline metrics to compare with")
    for rel, p in kept:
        target = dest / Path(*p)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(git_show(rev, rel), encoding="utf-8")
    return files, baseline_dirs(dest)


def _metrics_dir_name(name: str) -> bool:
    return name == "metrics" or (name.startswith("replicate-") and name[10:].isdigit())


def params_diff(work: Path, env: dict, base_label: str, head_label: str) -> str:
    """`dvc params diff --md` from the base's commit to the run's, its columns named by the labels."""
    out = subprocess.run(
        ["dvc", "params", "diff", "HEAD~1", "HEAD", "--md"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    ).stdout.strip()
    lines = out.splitlines()
    cells = [c.strip() for c in lines[0].strip("|").split("|")] if lines else []
    if cells[2:] == ["HEAD~1", "HEAD"]:  # | Path | Param | HEAD~1 | HEAD |
        lines[0] = "| " + " | ".join([*cells[:2], base_label, head_label]) + " |"
    return "\n".join(lines)


def run_replicates(works: list[Path], env: dict, jobs: int, logs: Path) -> None:
    """`dvc repro` in each workspace, `jobs` at a time; a line as each finishes. A failed one stops
    the rest and raises, its log's last lines printed."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, running = [(work.name, work) for work in works], []
    t0 = time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                r, work = pending.pop(0)
                log = open(logs / f"{r}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
                proc = subprocess.Popen(
                    ["dvc", "repro"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
                running.append((r, proc, log, time.monotonic()))
                print(f"{r}: dvc repro in {work} (log: {log.name})", flush=True)
            time.sleep(0.5)
            for item in list(running):
                r, proc, log, started = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                if proc.returncode:
                    tail = Path(log.name).read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
                    print("\n".join(tail), file=sys.stderr)
                    raise subprocess.CalledProcessError(proc.returncode, ["dvc", "repro", f"({r})"])
                print(f"{r}: done in {time.monotonic() - started:.0f} s", flush=True)
        print(f"{len(works)} replicates in {time.monotonic() - t0:.0f} s, {jobs} at a time", flush=True)
    finally:
        for _, proc, log, _ in running:
            proc.terminate()
            proc.wait()
            log.close()


def update_baseline(works: list[Path]) -> None:
    """ci/baseline/replicate-<r>/: each replicate's metrics and loss curves (small CSVs: a pull
    request's comment draws them beside its own); report.md of replicate 0."""
    for old in [BASELINE / "metrics", *BASELINE.glob("replicate-*")]:
        shutil.rmtree(old, ignore_errors=True)
    for r, work in enumerate(works):
        dest = replicate_dir(BASELINE, r)
        shutil.copytree(work / "metrics", dest, ignore=shutil.ignore_patterns("curves"))
        (dest / "curves").mkdir()
        for curve in sorted((work / "metrics" / "curves").glob("*.csv")):
            shutil.copy2(curve, dest / "curves" / curve.name)
    shutil.copy2(works[0] / "reports" / "report.md", BASELINE / "report.md")
    print(f"baseline updated: {len(works)} replicates in {BASELINE}")


def default_jobs(replicates: int, threads: int) -> int:
    """Replicates at once: as many as the cores hold at the profile's threads each."""
    return max(1, min(replicates, (os.cpu_count() or 1) // max(threads, 1)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-baseline", action="store_true", help="store the replicates' metrics as the baseline")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies and print their path")
    parser.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="change a param after the profile"
    )
    parser.add_argument(
        "--replicates", type=int, default=None, metavar="R",
        help=f"runs of the profile, runtime.replicate=0..R-1 (default {REPLICATES}; "
        f"{BASELINE_REPLICATES} with --update-baseline)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=None, help="replicates at once (default: one per core)")
    parser.add_argument("--comment", metavar="DIR", help="write the pull-request comment and its images to DIR")
    parser.add_argument("--base", metavar="REV", help="with --comment: compare with this revision's CI profile")
    parser.add_argument("--base-label", help="the base's name in the comment (default: REV, or ci/baseline)")
    parser.add_argument("--head-label", default="this run", help="the run's name in the comment")
    args = parser.parse_args()
    if args.base and not args.comment:
        parser.error("--base needs --comment DIR")
    if args.replicates is None:
        args.replicates = BASELINE_REPLICATES if args.update_baseline else REPLICATES
    if args.replicates < 1 or (args.jobs is not None and args.jobs < 1):
        parser.error("--replicates and --jobs must be at least 1")
    if any(text.partition("=")[0].strip() == REPLICATE_KEY for text in args.set):
        parser.error(f"-S {REPLICATE_KEY}: --replicates sets it (replicate r runs with {REPLICATE_KEY}=r)")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    scratch = Path(tempfile.mkdtemp(prefix="llm-ci-"))
    try:
        base_files, base_metrics = base_side(args.base, scratch / "base") if args.comment else (None, None)
        if args.comment and Path(args.comment).exists() and not Path(args.comment).is_dir():
            raise LLMError(f"--comment {args.comment} is a file: give a directory")
        profile = yaml.safe_load(PROFILE.read_text())
        works = [
            make_workspace(replicate_dir(scratch, r), profile, [*args.set, f"{REPLICATE_KEY}={r}"], base_files)
            for r in range(args.replicates)
        ]
        threads = read_yaml(works[0] / "params.yaml")["runtime"]["threads"]
        run_replicates(works, env, args.jobs or default_jobs(args.replicates, threads), scratch / "logs")
        if args.update_baseline:
            update_baseline(works)
            return 0
        news = [str(work / "metrics") for work in works]
        olds = [str(d) for d in baseline_dirs()]
        compare = [str(bin_dir / "llm"), "compare", "--old", *olds, "--new", *news]
        compare += ["--thresholds", str(ROOT / "thresholds.yaml")]
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary and not args.comment:
            compare += ["--markdown", summary]
        code = subprocess.run(compare, env=env).returncode
        if args.comment:
            base_label = args.base_label or args.base or "ci/baseline"
            write_comment(
                args.comment,
                base_metrics,
                news,
                load_gates(ROOT / "thresholds.yaml"),
                params_diff(works[0], env, base_label, args.head_label),
                base_label=base_label,
                head_label=args.head_label,
                gate_base=baseline_dirs(),
                footer=f"The CI profile ({PROFILE.relative_to(ROOT)}), {args.replicates} replicates against the "
                f"{len(baseline_dirs())} of ci/baseline; "
                f"locally: `python ci/run_profile.py{f' --base {base_label}' if args.base else ''} --comment DIR`",
            )
            print(f"comment written: {Path(args.comment) / 'comment.md'}")
            if summary:
                with open(summary, "a", encoding="utf-8") as f:
                    f.write((Path(args.comment) / "summary.md").read_text(encoding="utf-8"))
        return code
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()
        why = f": {detail[-1]}" if detail else ""
        print(
            f"ci/run_profile.py: {' '.join(map(str, exc.cmd))} failed with exit {exc.returncode}{why}", file=sys.stderr
        )
        return 1
    except LLMError as exc:
        return report_error("ci/run_profile.py", exc)
    finally:
        if args.keep:
            print(f"scratch copy kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
