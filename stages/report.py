"""Stage report: the whole run on one page, `reports/report.md` (and `.html`) with PNG figures.

Reads every stage's metrics, curves, samples and responses (a stage that did not run is shown
as "not run"), params.yaml, and what the checkpoints recorded; writes `reports/` and
`metrics/report.json`.
"""

import platform
import subprocess
from pathlib import Path

import torch
import yaml

from llm.errors import run_main
from llm.io import write_json
from llm.params import load_params
from llm.report import STAGES, ReportInputs, read_curve, read_json, write_report

OUT = Path("reports")
METRICS = Path("metrics/report.json")
CURVES = ("pretrain", "finetune_spam", "finetune_spam_accuracy", "finetune_instruct")
CHECKPOINTS = {"pretrain": "models/pretrain", "finetune_spam": "models/spam", "finetune_instruct": "models/instruct"}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def main(params_path: str = "params.yaml") -> dict:
    load_params(params_path)  # valid, or one line naming the key
    inputs = ReportInputs(
        params=yaml.safe_load(Path(params_path).read_text()),
        metrics={stage: read_json(Path(f"metrics/{stage}.json")) for stage in STAGES},
        curves={name: read_curve(Path(f"metrics/curves/{name}.csv")) for name in CURVES},
        samples=read_json(Path("data/eval/samples.json")),
        responses=read_json(Path("data/instruct/responses.json")),
        runs={stage: read_json(Path(path) / "config.json") or {} for stage, path in CHECKPOINTS.items()},
        environment={"git_commit": git_commit(), "torch": torch.__version__, "python": platform.python_version()},
    )
    metrics = write_report(inputs, OUT)
    write_json(METRICS, metrics)
    print(f"wrote {OUT / 'report.md'} and {OUT / 'report.html'}: {metrics['figures']} figures")
    return metrics


if __name__ == "__main__":
    run_main("report", main)
