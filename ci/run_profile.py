"""Run the whole pipeline on the CI profile in a scratch copy of the project, then gate its metrics.

    python ci/run_profile.py                     # run, then `llm compare` against ci/baseline
    python ci/run_profile.py --update-baseline   # run, then make its metrics the new baseline

The copy holds the tracked and untracked-but-not-ignored files (what a commit would hold), so
the workspace, its params.yaml and its DVC cache are never touched. Stages run through `dvc
repro` with the venv's tools first on PATH. Exit status: that of `llm compare` (1 = regression).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from llm.pipeline.validate import read_yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "ci" / "profile.yaml"
BASELINE = ROOT / "ci" / "baseline"


def project_files(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return [rel for rel in listed if rel and (root / rel).is_file() and not rel.startswith(("data/", "models/"))]


def make_workspace(dest: Path, profile: dict) -> Path:
    """A git repository at `dest` with the project's files and `profile` applied to params.yaml."""
    for rel in project_files(ROOT):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    params = read_yaml(dest / "params.yaml")  # YAML 1.2, as DVC and the stages read it
    for section, values in profile.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost"}
    env.update(GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@localhost")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "CI profile"]):
        subprocess.run(["git", *args], cwd=dest, env=env, check=True, stdout=subprocess.DEVNULL)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-baseline", action="store_true", help="store this run's metrics as the baseline")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy and print its path")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    scratch = Path(tempfile.mkdtemp(prefix="llm-ci-"))
    try:
        work = make_workspace(scratch / "project", yaml.safe_load(PROFILE.read_text()))
        subprocess.run(["dvc", "repro"], cwd=work, env=env, check=True, stdin=subprocess.DEVNULL)
        if args.update_baseline:
            shutil.rmtree(BASELINE / "metrics", ignore_errors=True)
            shutil.copytree(work / "metrics", BASELINE / "metrics", ignore=shutil.ignore_patterns("curves"))
            shutil.copy2(work / "reports" / "report.md", BASELINE / "report.md")
            print(f"baseline updated: {BASELINE / 'metrics'}")
            return 0
        compare = [str(bin_dir / "llm"), "compare", "--old", str(BASELINE / "metrics"), "--new", str(work / "metrics")]
        compare += ["--thresholds", str(ROOT / "thresholds.yaml")]
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            compare += ["--markdown", os.environ["GITHUB_STEP_SUMMARY"]]
        return subprocess.run(compare, env=env).returncode
    except subprocess.CalledProcessError as exc:
        print(f"ci/run_profile.py: {' '.join(map(str, exc.cmd))} failed with exit {exc.returncode}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"scratch copy kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
