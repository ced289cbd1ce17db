"""Stage report: the whole run on one page, `reports/report.md` (and `.html`) with PNG figures.

Reads every stage's metrics, curves, samples and responses (a stage that did not run is shown
as "not run"), params.yaml and what the checkpoints recorded; writes `reports/report.md`,
`reports/report.html`, `reports/figures/` and `metrics/report.json`. Like every output of the
pipeline, the page depends only on code, data and params: no wall times, no git commit (dvc.lock
records which code and params made it).
"""

import platform
from pathlib import Path

import torch

from llm.checkpoint import checkpoint_meta
from llm.errors import run_main
from llm.files import write_json
from llm.pipeline.params import load_params
from llm.pipeline.report import STAGES, ReportInputs, read_curve, read_json, write_report

STAGE_METRICS = {stage: Path(f"metrics/{stage}.json") for stage in STAGES}
CURVES = [
    Path(f"metrics/curves/{name}.csv")
    for name in ("pretrain", "finetune_spam", "finetune_spam_accuracy", "finetune_instruct", "finetune_dpo")
]
CONFUSION = Path("metrics/curves/finetune_spam_confusion.json")
SAMPLES = Path("data/eval/samples.json")
RESPONSES = Path("data/instruct/responses.json")
DPO_RESPONSES = Path("data/dpo/responses.json")
CHECKPOINTS = {
    "pretrain": Path("models/pretrain"),
    "finetune_spam": Path("models/spam"),
    "finetune_instruct": Path("models/instruct"),
    "finetune_dpo": Path("models/dpo"),
}
OUT = Path("reports")
METRICS = Path("metrics/report.json")


def main(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)  # valid, or one line naming the key
    inputs = ReportInputs(
        params=params.model_dump(),  # every setting, those left at their default too
        metrics={stage: read_json(path) for stage, path in STAGE_METRICS.items()},
        curves={path.as_posix(): read_curve(path) for path in CURVES},
        confusion=read_json(CONFUSION),
        samples=read_json(SAMPLES),
        responses=read_json(RESPONSES),
        dpo_responses=read_json(DPO_RESPONSES),
        runs={stage: checkpoint_meta(path) if path.is_dir() else {} for stage, path in CHECKPOINTS.items()},
        environment={"torch": torch.__version__, "python": platform.python_version()},
    )
    metrics = write_report(inputs, OUT)
    write_json(METRICS, metrics)
    print(f"wrote {OUT / 'report.md'} and {OUT / 'report.html'}: {metrics['figures']} figures")
    return metrics


if __name__ == "__main__":
    run_main("report", main, doc=__doc__)
