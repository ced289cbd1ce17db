"""The run on one page: figures (matplotlib PNGs) and tables from the stages' metrics and curves.

`write_report` takes what the stages left (any of it may be missing: a stage that did not run
is shown as "not run") and writes `report.md`, `report.html` and `figures/*.png`.

Each figure is defined once. `CURVES` are the curves' definitions (title, x, y columns, axis
labels) in the form of `dvc.yaml`'s top-level `plots:`, which must equal them (a test checks it):
DVC draws them for `dvc plots show` and `dvc plots diff`, this module draws them as the page's
PNGs. The confusion matrix is drawn from the rows DVC's confusion plot reads. Only the comparison
with the TF-IDF baseline, which DVC does not plot, is the page's own.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.files import atomic_write_bytes
from llm.pipeline.compare import flatten
from llm.pipeline.doc import Doc, number


def _curve(title: str, x: str, file: str, columns: list[str], x_label: str, y_label: str) -> dict:
    return {"title": title, "template": "linear", "x": x, "y": {file: columns}, "x_label": x_label, "y_label": y_label}


LOSS = ["train_loss", "val_loss"]
CURVES: dict[str, dict] = {
    "pretrain_loss": _curve(
        "Pretraining loss", "tokens_seen", "metrics/curves/pretrain.csv", LOSS, "tokens seen", "cross-entropy loss"
    ),
    "finetune_spam_loss": _curve(
        "Spam finetuning loss",
        "examples_seen",
        "metrics/curves/finetune_spam.csv",
        LOSS,
        "training examples seen",
        "cross-entropy loss",
    ),
    "finetune_spam_accuracy": _curve(
        "Spam finetuning accuracy (eval_iter batches, after each epoch)",
        "epoch",
        "metrics/curves/finetune_spam_accuracy.csv",
        ["train_accuracy", "val_accuracy"],
        "epoch",
        "accuracy",
    ),
    "finetune_instruct_loss": _curve(
        "Instruction finetuning loss",
        "tokens_seen",
        "metrics/curves/finetune_instruct.csv",
        LOSS,
        "tokens seen",
        "cross-entropy loss",
    ),
    "finetune_dpo_loss": _curve(
        "Preference tuning (DPO) loss",
        "tokens_seen",
        "metrics/curves/finetune_dpo.csv",
        LOSS,
        "tokens seen",
        "DPO loss",
    ),
    "finetune_dpo_rewards": _curve(
        "Preference tuning (DPO) rewards and margin",
        "tokens_seen",
        "metrics/curves/finetune_dpo.csv",
        [
            "train_chosen_reward",
            "train_rejected_reward",
            "val_chosen_reward",
            "val_rejected_reward",
            "val_reward_margin",
        ],
        "tokens seen",
        "reward (log-probability vs the reference)",
    ),
}

STAGES = ("prepare_text", "pretrain", "eval", "finetune_spam", "finetune_instruct", "finetune_dpo")
_TITLES = {
    "prepare_text": "Data (chapter 2)",
    "pretrain": "Pretraining (chapter 5)",
    "eval": "Evaluation and samples (chapter 5)",
    "finetune_spam": "Spam classification (chapter 6)",
    "finetune_instruct": "Instruction finetuning (chapter 7)",
    "finetune_dpo": "Preference tuning (DPO, chapter 7's bonus)",
}


@dataclass
class ReportInputs:
    params: dict[str, Any]  # params.yaml as parsed
    metrics: dict[str, dict | None]  # stage -> metrics/<stage>.json, None when it did not run
    curves: dict[str, list[dict] | None] = field(default_factory=dict)  # CSV path -> its rows
    plots: dict[str, dict] = field(default_factory=lambda: dict(CURVES))  # the curves to draw, by id
    confusion: list[dict] | None = None  # the spam test set's {actual, predicted} rows (a DVC plot)
    samples: list[dict] | None = None  # data/eval/samples.json
    responses: list[dict] | None = None  # data/instruct/responses.json
    dpo_responses: list[dict] | None = None  # data/dpo/responses.json
    runs: dict[str, dict] = field(default_factory=dict)  # stage -> what its checkpoint recorded
    environment: dict[str, str] = field(default_factory=dict)  # torch, python


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is absent (the stage did not run)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_curve(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def fmt(value: Any) -> str:
    """A metric for the page: `doc.number`, or what a null means."""
    if value is None:
        return "null (not computable)"
    return number(value) if isinstance(value, (int, float)) else str(value)


def new_figure(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    return plt


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})  # no version stamp: same run, same bytes
    plt.close(fig)
    tmp.replace(path)


def plot_definition(defn: dict, rows: list[dict], path: Path, per_epoch: float | None = None) -> None:
    """A `dvc.yaml` plot definition drawn with matplotlib: each `y` column against `x`, with its
    title and axis labels. `per_epoch` (x units per epoch) adds an epoch axis on top, as the book
    plots its losses; when the rows' `lr` changes, the schedule is drawn below."""
    plt = new_figure(path)
    ((_, columns),) = defn["y"].items()
    columns = [columns] if isinstance(columns, str) else columns
    lrs = [r.get("lr") for r in rows]
    scheduled = len({lr for lr in lrs if lr is not None}) > 1
    fig, axes = plt.subplots(2 if scheduled else 1, 1, figsize=(7, 5.5 if scheduled else 3.8), squeeze=False)
    ax = axes[0][0]
    x = [r[defn["x"]] for r in rows]
    for i, column in enumerate(columns):
        ax.plot(x, [r.get(column) for r in rows], linestyle="-" if i == 0 else "-.", label=column.replace("_", " "))
    ax.set(xlabel=defn.get("x_label", defn["x"]), ylabel=defn.get("y_label", ""), title=defn.get("title", ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if all(float(v).is_integer() for v in x):  # epochs, steps: whole ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda t: t / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epochs")
    if scheduled:
        ax2 = axes[1][0]
        ax2.plot(x, lrs, color="tab:green")
        ax2.set(xlabel=defn.get("x_label", defn["x"]), ylabel="learning rate", title="Learning-rate schedule")
        ax2.grid(alpha=0.3)
    save_figure(plt, fig, path)


def plot_confusion(rows: list[dict], path: Path, labels: tuple[str, str] = ("ham", "spam")) -> None:
    """The confusion matrix of {actual, predicted} rows (what DVC's `confusion` template reads)."""
    plt = new_figure(path)
    cells = [[sum(r["actual"] == a and r["predicted"] == p for r in rows) for p in labels] for a in labels]
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cells, cmap="Blues")
    peak = max(max(r) for r in cells) or 1
    for i in range(2):
        for j in range(2):
            color = "white" if cells[i][j] > peak / 2 else "black"
            ax.text(j, i, f"{int(cells[i][j])}", ha="center", va="center", fontsize=14, color=color)
    ax.set_xticks([0, 1], labels=list(labels))
    ax.set_yticks([0, 1], labels=list(labels))
    ax.set(xlabel="predicted", ylabel="actual", title="Test set confusion matrix")
    save_figure(plt, fig, path)


def plot_vs_baseline(m: dict, path: Path) -> None:
    plt = new_figure(path)
    names = ["accuracy", "precision", "recall", "f1"]
    llm = [100 * m[f"test.{n}"] for n in names]
    base = [100 * m[f"baseline.test.{n}"] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    pos = range(len(names))
    bars = ax.bar([p - 0.2 for p in pos], llm, width=0.4, label="LLM classifier")
    bars2 = ax.bar([p + 0.2 for p in pos], base, width=0.4, label="TF-IDF + logistic regression")
    for b in (*bars, *bars2):
        ax.annotate(f"{b.get_height():.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    low = min(llm + base)
    ax.set_ylim(max(0, low - 10), 100.5)
    ax.set_xticks(list(pos), labels=names)
    ax.set(ylabel="test set (%)", title="LLM classifier vs classic baseline")
    ax.legend(loc="lower right")
    save_figure(plt, fig, path)


def build(inputs: ReportInputs, out_dir: Path) -> Doc:
    """The report page; its figures are written to `out_dir/figures`."""
    metrics = {stage: None if m is None else flatten(m) for stage, m in inputs.metrics.items()}  # val.loss
    inputs = dataclasses.replace(inputs, metrics=metrics)
    m, env = inputs.metrics, inputs.environment
    doc = Doc("LLMs from scratch: pipeline report")
    ran = [s for s in STAGES if m.get(s) is not None]
    missing = [s for s in STAGES if s not in ran]
    doc.para(
        f"Stages with results: {', '.join(ran) or 'none'}"
        + (f"; not run: {', '.join(missing)}" if missing else "")
        + f". torch {env.get('torch', '?')}, Python {env.get('python', '?')}; dvc.lock records the code, "
        "data and params behind every number."
    )
    doc.heading("Run summary")
    doc.table(["stage", "what", "value"], _summary_rows(inputs))
    sections = {
        "prepare_text": _data_section,
        "pretrain": _pretrain_section,
        "eval": _eval_section,
        "finetune_spam": _spam_section,
        "finetune_instruct": _instruct_section,
        "finetune_dpo": _dpo_section,
    }
    for stage, section in sections.items():
        doc.heading(_TITLES[stage])
        if m.get(stage) is None:
            doc.para(f"_not run_: there is no `metrics/{stage}.json`.")
        else:
            section(doc, inputs, out_dir / "figures")
            doc.table(["metric", "value"], [[k, fmt(v)] for k, v in m[stage].items()])
    doc.heading("Parameters")
    doc.para("Every setting the stages ran with (params.yaml):")
    doc.pre(_params_text(inputs.params))
    return doc


def _settings(doc: Doc, params: dict, name: str, keys: list[str]) -> None:
    section = params.get(name) or {}
    shown = [f"{k} {'null' if section[k] is None else section[k]}" for k in keys if k in section]
    if shown:
        doc.para(f"Settings (`{name}` in params.yaml): " + ", ".join(shown) + ".")


def _trained(doc: Doc, inputs: ReportInputs, stage: str) -> None:
    """What trained in a finetuning stage: the parameter counts, and the LoRA settings when LoRA was on."""
    m = inputs.metrics[stage]
    trainable, total = m.get("parameters.trainable"), m.get("parameters.total")
    if not trainable or not total:
        return
    lora = (inputs.params.get(stage) or {}).get("lora") or {}
    if lora.get("rank"):
        how = f"LoRA adapters, rank {lora['rank']}, alpha {fmt(lora['alpha'])}, on {', '.join(lora['targets'])}"
    else:
        how = "no LoRA"
    doc.para(f"Trainable parameters: {int(trainable):,} of {int(total):,} ({trainable / total:.2%}); {how}.")


def _curve_figure(doc: Doc, inputs: ReportInputs, figures: Path, plot_id: str, stage: str, section: str) -> None:
    """dvc.yaml's plot `plot_id`, if it is defined and its curve exists, with epochs on top."""
    defn = inputs.plots.get(plot_id)
    if not defn:
        return
    ((file, _),) = defn["y"].items()
    rows = inputs.curves.get(file)
    if not rows:
        return
    metrics = inputs.metrics[stage]
    settings = inputs.params.get(section) or {}
    epochs, per_epoch = settings.get("num_epochs"), None
    if epochs and defn["x"] == "tokens_seen" and metrics.get("tokens_seen"):
        per_epoch = metrics["tokens_seen"] / epochs
    elif epochs and defn["x"] == "examples_seen" and metrics.get("steps") and settings.get("batch_size"):
        per_epoch = metrics["steps"] * settings["batch_size"] / epochs
    plot_definition(defn, rows, figures / f"{plot_id}.png", per_epoch)
    doc.image(f"figures/{plot_id}.png", defn.get("title", plot_id))


def _data_section(doc: Doc, inputs: ReportInputs, figures: Path) -> None:
    corpus = ", ".join((inputs.params.get("data") or {}).get("corpus", []))
    doc.para(f"Corpus: {corpus}. Text split on characters, then tokenized with GPT-2's BPE (tiktoken).")


def _pretrain_section(doc: Doc, inputs: ReportInputs, figures: Path) -> None:
    keys = ["num_epochs", "batch_size", "max_length", "lr", "lr_schedule", "weight_decay", "seed"]
    _settings(doc, inputs.params, "train", keys)
    _curve_figure(doc, inputs, figures, "pretrain_loss", "pretrain", "train")


def _eval_section(doc: Doc, inputs: ReportInputs, figures: Path) -> None:
    for s in inputs.samples or []:
        doc.para(
            f"Prompt `{s['prompt']}`: greedy, then sampled (temperature {s.get('temperature')}, "
            f"top-k {s.get('top_k')}, seed {s.get('seed')}):"
        )
        doc.pre(f"{s['greedy']}\n\n{s['sampled']}")


def _spam_section(doc: Doc, inputs: ReportInputs, figures: Path) -> None:
    ms = inputs.metrics["finetune_spam"]
    _settings(doc, inputs.params, "finetune_spam", ["init", "trainable_blocks", "pooling", "num_epochs", "lr"])
    _trained(doc, inputs, "finetune_spam")
    _curve_figure(doc, inputs, figures, "finetune_spam_loss", "finetune_spam", "finetune_spam")
    _curve_figure(doc, inputs, figures, "finetune_spam_accuracy", "finetune_spam", "finetune_spam")
    if inputs.confusion:
        plot_confusion(inputs.confusion, figures / "finetune_spam_confusion.png")
        doc.image("figures/finetune_spam_confusion.png", "test confusion matrix")
    names = ["accuracy", "precision", "recall", "f1"]
    if all(f"baseline.test.{n}" in ms and f"test.{n}" in ms for n in names):
        plot_vs_baseline(ms, figures / "finetune_spam_baseline.png")
        doc.image("figures/finetune_spam_baseline.png", "LLM classifier against the TF-IDF baseline")
        doc.table(
            ["test set", "LLM classifier", "TF-IDF + logistic regression"],
            [[n, f"{100 * ms[f'test.{n}']:.2f}%", f"{100 * ms[f'baseline.test.{n}']:.2f}%"] for n in names],
        )


def _instruct_section(doc: Doc, inputs: ReportInputs, figures: Path) -> None:
    keys = ["init", "prompt_style", "mask_prompt", "num_epochs", "lr"]
    _settings(doc, inputs.params, "finetune_instruct", keys)
    _trained(doc, inputs, "finetune_instruct")
    _curve_figure(doc, inputs, figures, "finetune_instruct_loss", "finetune_instruct", "finetune_instruct")
    if inputs.responses:
        doc.para(f"The first test instructions ({len(inputs.responses)} in `data/instruct/responses.json`):")
        doc.table(
            ["instruction", "input", "reference", "model response"],
            [
                [r["instruction"], r.get("input", ""), r.get("output", ""), r.get("model_response", "")]
                for r in inputs.responses[:5]
            ],
        )


DPO_SPLITS = ("train", "val", "test")
DPO_METRICS = {  # name in metrics/finetune_dpo.json -> the table's row
    "reward_margin": "reward margin",
    "preference_accuracy": "preference accuracy",
    "chosen_reward": "chosen reward",
    "rejected_reward": "rejected reward",
    "logprob_margin": "log-prob margin (chosen - rejected)",
    "logprob_accuracy": "log-prob accuracy (chosen likelier)",
    "loss": "DPO loss",
}


def _share(value: Any) -> str:
    return fmt(value) if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"


def _dpo_cell(m: dict, key: str) -> str:
    """A flattened metric of finetune_dpo for the table: accuracies as percentages, "-" when absent."""
    if key not in m:
        return "-"
    return _share(m[key]) if key.endswith("accuracy") else fmt(m[key])


def _dpo_section(doc: Doc, inputs: ReportInputs, figures: Path) -> None:
    m = inputs.metrics["finetune_dpo"]
    keys = ["init", "beta", "num_epochs", "batch_size", "lr", "mask_prompt", "allowed_max_length"]
    _settings(doc, inputs.params, "finetune_dpo", keys)
    _trained(doc, inputs, "finetune_dpo")
    doc.para(
        "A pair's reward is the policy's mean log-probability of an answer minus the reference's (the starting "
        "model, frozen); the margin is the chosen reward minus the rejected one, and the preference accuracy the "
        "share of pairs whose margin is positive. Before tuning the policy is the reference, so its rewards are "
        "0 and its loss ln 2 (0.6931). The log-prob margin and accuracy are the model's own preference for the "
        "chosen answer, without the reference."
    )
    _curve_figure(doc, inputs, figures, "finetune_dpo_loss", "finetune_dpo", "finetune_dpo")
    _curve_figure(doc, inputs, figures, "finetune_dpo_rewards", "finetune_dpo", "finetune_dpo")
    columns = [(s, phase) for s in DPO_SPLITS for phase in ("before", "after")]
    columns = [(s, phase) for s, phase in columns if any(k.startswith(f"{s}.{phase}.") for k in m)]
    rows = [
        [label] + [_dpo_cell(m, f"{s}.{phase}.{key}") for s, phase in columns]
        for key, label in DPO_METRICS.items()
        if any(f"{s}.{phase}.{key}" in m for s, phase in columns)
    ]
    if rows:
        doc.para("Before (the reference) and after (the tuned policy), over every pair of each split:")
        doc.table(["metric"] + [f"{s} {phase}" for s, phase in columns], rows)
    rouge = [
        (f"against {a}", m.get(f"test.before.rouge_l_{a}"), m.get(f"test.after.rouge_l_{a}"))
        for a in ("chosen", "rejected")
    ]
    if any(before is not None or after is not None for _, before, after in rouge):
        doc.para("How the answers to the test instructions moved: the mean ROUGE-L F1 of the model's answers")
        doc.table(["ROUGE-L F1", "before", "after"], [[what, fmt(b), fmt(a)] for what, b, a in rouge])
    if inputs.dpo_responses:
        doc.para(
            f"The first three test instructions (of {len(inputs.dpo_responses)} in `data/dpo/responses.json`), "
            "answered before (by the reference) and after tuning:"
        )
        doc.table(
            ["instruction", "chosen", "rejected", "before (reference)", "after (tuned)"],
            [
                [
                    r["instruction"] + (f" (input: {r['input']})" if r.get("input") else ""),
                    r.get("chosen", ""),
                    r.get("rejected", ""),
                    r.get("reference_response", ""),
                    r.get("policy_response", ""),
                ]
                for r in inputs.dpo_responses[:3]
            ],
        )


def _summary_rows(inputs: ReportInputs) -> list[list[str]]:
    p, m, runs = inputs.params, inputs.metrics, inputs.runs
    rows = []
    model = runs.get("pretrain", {}).get("model") or {}
    mp = m.get("pretrain")
    if mp is None:
        rows.append(["pretrain", "not run", ""])
    else:
        info = runs.get("pretrain", {}).get("training", {})
        shape = ", ".join(f"{k} {model[k]}" for k in ("emb_dim", "n_layers", "n_heads", "context_length") if k in model)
        rows += [
            ["pretrain", "model", f"{shape} ({fmt(mp.get('params', 0))} parameters)" if shape else "?"],
            ["pretrain", "init", str((p.get("model") or {}).get("init", "scratch"))],
            ["pretrain", "tokens seen / epochs", f"{fmt(mp.get('tokens_seen'))} / {fmt(mp.get('epochs'))}"],
            ["pretrain", "lr", fmt((p.get("train") or {}).get("lr"))],
            ["pretrain", "train / val loss", f"{fmt(mp.get('train.loss'))} / {fmt(mp.get('val.loss'))}"],
            ["pretrain", "device / precision", f"{info.get('device', '?')} / {info.get('precision', '?')}"],
        ]
    me = m.get("eval")
    rows.append(
        [
            "eval",
            "val loss (perplexity)",
            "not run" if me is None else f"{fmt(me['val.loss'])} ({fmt(me['val.perplexity'])})",
        ]
    )
    ms = m.get("finetune_spam")
    if ms is None:
        rows.append(["finetune_spam", "test accuracy", "not run"])
    else:
        rows += [
            [
                "finetune_spam",
                "test accuracy (baseline)",
                f"{100 * ms['test.accuracy']:.2f}% ({100 * ms.get('baseline.test.accuracy', float('nan')):.2f}%)",
            ],
        ]
    mi = m.get("finetune_instruct")
    if mi is None:
        rows.append(["finetune_instruct", "ROUGE-L", "not run"])
    else:
        rows += [
            [
                "finetune_instruct",
                "ROUGE-L / test response loss",
                f"{fmt(mi['test.rouge_l'])} / {fmt(mi.get('test.response_loss'))}",
            ],
        ]
    md = m.get("finetune_dpo")
    if md is None:
        rows.append(["finetune_dpo", "preference accuracy", "not run"])
    else:
        rows.append(
            [
                "finetune_dpo",
                "test preference accuracy / reward margin",
                f"{_share(md.get('test.after.preference_accuracy'))} / {fmt(md.get('test.after.reward_margin'))}",
            ]
        )
    env = inputs.environment
    rows.append(
        [
            "all",
            "torch / Python",
            f"{env.get('torch', '?')} / {env.get('python', '?')}",
        ]
    )
    return rows


def _params_text(params: dict) -> str:
    import yaml

    shown = {k: v for k, v in params.items() if k != "sources"}
    return yaml.safe_dump(shown, sort_keys=False, width=100)


def write_report(inputs: ReportInputs, out_dir: str | Path) -> dict[str, int]:
    """Write `report.md`, `report.html` and the figures; returns counts for the stage's metrics."""
    out_dir = Path(out_dir)
    doc = build(inputs, out_dir)
    atomic_write_bytes(out_dir / "report.md", doc.markdown().encode())
    atomic_write_bytes(out_dir / "report.html", doc.html(image_root=out_dir).encode())
    return {
        "stages_reported": sum(inputs.metrics.get(s) is not None for s in STAGES),
        "figures": sum(kind == "img" for kind, *_ in doc.blocks),
    }
