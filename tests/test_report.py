"""The report stage's page, from metrics files made here; missing stages show as "not run"."""

import json

from llm.pipeline.doc import markdown_table, number, text_table
from llm.pipeline.params import Params
from llm.pipeline.report import CURVES, ReportInputs, read_curve, read_json, write_report
from llm.pipeline.validate import read_yaml
from tests.conftest import ROOT, dpo_metrics

PARAMS = Params().model_dump()  # the committed defaults
PLOTS = {pid: defn for entry in read_yaml(ROOT / "dvc.yaml")["plots"] for pid, defn in entry.items()}


def curve(n, lr=0.0004):
    return [
        {
            "step": i,
            "epoch": 1 + i // 5,
            "tokens_seen": 512 * i,
            "examples_seen": 2 * i,
            "train_loss": 9 - i / 2,
            "val_loss": 9.5 - i / 3,
            "lr": lr,
        }
        for i in range(n)
    ]


def dpo_curve(n):
    return [
        dict(
            row,
            train_chosen_reward=row["step"] / 100,
            train_rejected_reward=-row["step"] / 100,
            val_chosen_reward=row["step"] / 200,
            val_rejected_reward=-row["step"] / 200,
            val_reward_margin=row["step"] / 100,
        )
        for row in curve(n, lr=5e-6)
    ]


DPO_RESPONSE = {
    "instruction": "Rewrite | politely.",
    "input": "Give me the salt.",
    "output": "Could you pass the salt?",
    "chosen": "Could you please pass the salt?",
    "rejected": "Salt. Now.",
    "reference_response": "Give salt.",
    "policy_response": "Please pass the salt.",
}


def full_inputs():
    metrics = {
        name: json.loads((ROOT / f"ci/baseline/replicate-0/{name}.json").read_text())
        for name in ("prepare_text", "eval")
    }
    metrics["pretrain"] = {
        "train": {"loss": 4.9},
        "val": {"loss": 6.3},
        "tokens_seen": 46080,
        "steps": 90,
        "epochs": 10,
        "params": 29_000_000,
    }
    metrics["finetune_spam"] = json.loads((ROOT / "ci/baseline/replicate-0/finetune_spam.json").read_text())
    metrics["finetune_instruct"] = json.loads((ROOT / "ci/baseline/replicate-0/finetune_instruct.json").read_text())
    metrics["finetune_dpo"] = dpo_metrics()
    return ReportInputs(
        params=PARAMS,
        metrics=metrics,
        curves={
            "metrics/curves/pretrain.csv": [dict(r, lr=0.0004 * (1 - r["step"] / 10)) for r in curve(10)],  # a schedule
            "metrics/curves/finetune_spam.csv": curve(6),
            "metrics/curves/finetune_spam_accuracy.csv": [
                {"epoch": 1, "train_accuracy": 0.9, "val_accuracy": 0.85},
                {"epoch": 2, "train_accuracy": 0.97, "val_accuracy": 0.93},
            ],
            "metrics/curves/finetune_instruct.csv": curve(8),
            "metrics/curves/finetune_dpo.csv": dpo_curve(6),
        },
        plots=PLOTS,
        confusion=[{"actual": "ham", "predicted": "ham"}] * 140 + [{"actual": "spam", "predicted": "ham"}] * 9,
        samples=[
            {
                "prompt": "Every effort moves you",
                "greedy": "Every effort moves you |x|",
                "sampled": "Every effort s",
                "temperature": 1.4,
                "top_k": 25,
                "seed": 123,
            }
        ],
        responses=[{"instruction": "Name a | color.", "input": "", "output": "Red.", "model_response": "Blue."}] * 7,
        dpo_responses=[DPO_RESPONSE] * 5,
        runs={
            "pretrain": {
                "model": {"emb_dim": 256, "n_layers": 4, "n_heads": 4, "context_length": 256},
                "training": {"device": "cpu", "precision": "fp32"},
            }
        },
        environment={"torch": "2.13.0", "python": "3.11.7"},
    )


def test_full_report(tmp_path):
    counts = write_report(full_inputs(), tmp_path)
    assert counts == {"stages_reported": 6, "figures": 8}
    md = (tmp_path / "report.md").read_text()
    for figure in (
        "pretrain_loss",
        "finetune_spam_loss",
        "finetune_spam_accuracy",
        "finetune_spam_confusion",
        "finetune_spam_baseline",
        "finetune_instruct_loss",
        "finetune_dpo_loss",
        "finetune_dpo_rewards",
    ):
        png = tmp_path / "figures" / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(figures/{figure}.png)" in md
    assert "not run" not in md
    assert "| pretrain | model | emb_dim 256, n_layers 4, n_heads 4, context_length 256 (29,000,000 parameters) |" in md
    ms = full_inputs().metrics["finetune_spam"]
    accuracy = f"{100 * ms['test']['accuracy']:.2f}% ({100 * ms['baseline']['test']['accuracy']:.2f}%)"
    assert f"| finetune_spam | test accuracy (baseline) | {accuracy} |" in md
    assert "| all | torch / Python | 2.13.0 / 3.11.7 |" in md
    assert "seconds" not in md and "tokens/s" not in md  # the page depends only on code, data and params
    assert "| Name a \\| color. |  | Red. | Blue. |" in md  # pipes in text do not break the table
    assert md.count("| Name a") == 5  # the first five test instructions
    assert "Every effort moves you |x|" in md  # samples as preformatted text
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count('<img src="data:image/png;base64,iVBORw0KGgo') == 8
    assert "<td>Name a | color.</td>" in html


def test_the_finetuning_sections_say_what_trained(tmp_path):
    inputs = full_inputs()
    inputs.metrics["finetune_spam"]["parameters"] = {"trainable": 2_655_746, "total": 127_108_354}
    inputs.metrics["finetune_instruct"]["parameters"] = {"trainable": 1_000, "total": 1_000}
    inputs.params["finetune_spam"] = {**inputs.params["finetune_spam"], "lora": {"rank": 16, "alpha": 16.0,
                                      "targets": ["attention", "feed_forward", "head"]}}  # fmt: skip
    write_report(inputs, tmp_path)
    md = (tmp_path / "report.md").read_text()
    lora = "LoRA adapters, rank 16, alpha 16, on attention, feed_forward, head"
    assert f"Trainable parameters: 2,655,746 of 127,108,354 (2.09%); {lora}." in md
    assert "Trainable parameters: 1,000 of 1,000 (100.00%); no LoRA." in md


def test_the_curves_are_dvc_yamls_plot_definitions(tmp_path):
    """One definition per curve: dvc.yaml's top-level plots are exactly the ones the page draws."""
    assert PLOTS == CURVES
    inputs = full_inputs()
    inputs.plots = {k: v for k, v in PLOTS.items() if k != "finetune_spam_accuracy"}
    counts = write_report(inputs, tmp_path)
    assert counts["figures"] == 7 and not (tmp_path / "figures/finetune_spam_accuracy.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert f"![{PLOTS['pretrain_loss']['title']}](figures/pretrain_loss.png)" in md


def test_same_inputs_same_bytes(tmp_path):
    write_report(full_inputs(), tmp_path / "a")
    write_report(full_inputs(), tmp_path / "b")
    for name in ("report.md", "report.html", "figures/pretrain_loss.png", "figures/finetune_spam_confusion.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_missing_stages_show_as_not_run(tmp_path):
    inputs = full_inputs()
    inputs.metrics = {"prepare_text": inputs.metrics["prepare_text"], "pretrain": inputs.metrics["pretrain"]}
    inputs.curves = {"metrics/curves/pretrain.csv": None}
    inputs.samples = inputs.responses = inputs.dpo_responses = None
    inputs.runs = {}
    counts = write_report(inputs, tmp_path)
    assert counts == {"stages_reported": 2, "figures": 0}
    md = (tmp_path / "report.md").read_text()
    for stage in ("eval", "finetune_spam", "finetune_instruct", "finetune_dpo"):
        assert f"_not run_: there is no `metrics/{stage}.json`." in md
    assert "not run: eval, finetune_spam, finetune_instruct, finetune_dpo" in md
    assert "| finetune_dpo | preference accuracy | not run |" in md


def test_the_dpo_section_shows_its_settings_curves_metrics_and_three_responses(tmp_path):
    write_report(full_inputs(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Preference tuning (DPO, chapter 7's bonus)") : md.index("## Parameters")]
    assert (
        "Settings (`finetune_dpo` in params.yaml): init instruct, beta 0.1, num_epochs 1, batch_size 8, lr 2e-05, "
        "mask_prompt True, allowed_max_length null." in section
    )
    assert "Trainable parameters: 2,000 of 2,000 (100.00%); no LoRA." in section
    for plot in ("finetune_dpo_loss", "finetune_dpo_rewards"):
        assert f"![{PLOTS[plot]['title']}](figures/{plot}.png)" in section
    header = "| metric | train before | train after | val before | val after | test before | test after |"
    assert header in section
    assert "| reward margin | 0 | 0.5 | 0 | 0.25 | 0 | 0.125 |" in section
    assert "| preference accuracy | 0.0% | 90.0% | 0.0% | 75.0% | 0.0% | 62.5% |" in section
    assert "| log-prob margin (chosen - rejected) | 0.25 | 0.75 | 0.25 | 0.5 | 0.25 | 0.375 |" in section
    assert "| log-prob accuracy (chosen likelier) | 50.0% | 72.5% | 50.0% | 68.8% | 50.0% | 65.6% |" in section
    assert "| DPO loss | 0.6931 | 0.6 | 0.6931 | 0.6 | 0.6931 | 0.6 |" in section
    assert "| against chosen | 0.2 | 0.35 |" in section and "| against rejected | 0.3 | 0.15 |" in section
    row = "| Rewrite \\| politely. (input: Give me the salt.) | Could you please pass the salt? | Salt. Now. "
    row += "| Give salt. | Please pass the salt. |"
    assert section.count(row) == 3  # the first three test responses, before and after
    assert "| finetune_dpo | test preference accuracy / reward margin | 62.5% / 0.125 |" in md
    png = tmp_path / "figures" / "finetune_dpo_rewards.png"
    assert png.stat().st_size > 1000


def test_the_dpo_section_builds_without_its_curve_and_responses(tmp_path):
    """A stage that ran without leaving a curve or responses (an older run, a copied metrics file)."""
    inputs = full_inputs()
    inputs.curves["metrics/curves/finetune_dpo.csv"] = None
    inputs.dpo_responses = None
    counts = write_report(inputs, tmp_path)
    assert counts == {"stages_reported": 6, "figures": 6}
    md = (tmp_path / "report.md").read_text()
    assert "| reward margin | 0 | 0.5 |" in md and "data/dpo/responses.json" not in md


def test_readers_return_none_for_absent_files(tmp_path):
    assert read_json(tmp_path / "x.json") is None and read_curve(tmp_path / "x.csv") is None
    (tmp_path / "c.csv").write_text("step,train_loss\n0,1.5\n5,1.25\n")
    assert read_curve(tmp_path / "c.csv") == [{"step": 0.0, "train_loss": 1.5}, {"step": 5.0, "train_loss": 1.25}]


def test_one_table_writer_and_one_number_format():
    rows = [["pretrain", number(6.21583), number(12345.0)], ["a|b", number(0.5), number(7)]]
    assert markdown_table(["stage", "loss", "tokens"], rows).splitlines() == [
        "| stage | loss | tokens |",
        "| --- | ---: | ---: |",
        "| pretrain | 6.216 | 12,345 |",
        "| a\\|b | 0.5 | 7 |",
    ]
    assert markdown_table(["a", "b"], [["1", "x"]], right=[False, True]).splitlines()[1] == "| --- | ---: |"
    assert text_table(["metric", "old"], [["val.loss", "6.2"]]).splitlines() == ["metric    old", "val.loss  6.2"]
    assert (number(float("nan")), number(0.000123456, digits=6), number(True)) == ("nan", "0.000123456", "True")
