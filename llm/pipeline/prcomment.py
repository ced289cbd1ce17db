"""The pull-request comment of the CI profile: what a reviewer reads without opening the run.

`write_comment(out, base, head, gates, params_diff)` takes two sides, each a metrics directory (a
copy of `metrics/`, with its `curves/`) or a list of them, one per replicate, the regression gates
and the text of `dvc params diff --md`, and writes `out/comment.md` and one PNG per loss curve. The
comment holds, in this order:

1. the gate's verdict (`compare.verdict`): passed, or which gated metrics regressed, and how it
   decided (`compare.method`: with replicates, Student's t-test and Holm across the gates);
2. the gated metrics, base against head (`compare.table`: with replicates, mean ± sd per side, the
   change ± its 95% interval, a verdict and p per metric), and the ungated metrics that changed,
   folded away;
3. the changed params (the `dvc params diff --md` text, or a line saying none changed);
4. the loss curves of base and head side by side (replicate 0 of each), one PNG per loss plot of
   `dvc.yaml` (`report.CURVES`), both panels on the same axes so that a shift shows.

Image links are relative to `comment.md`: `cml comment update` uploads the PNGs and rewrites the
links. `out/summary.md` is the same text for a job summary, which shows no local images: there
each image is a line naming its file.
"""

from __future__ import annotations

import re
from pathlib import Path

from llm.errors import LLMError
from llm.pipeline.compare import METRICS_DIR, Gate, Row, compare, method, read_metrics_dir, table, verdict
from llm.pipeline.report import CURVES, new_figure, read_curve, save_figure

LOSS_CURVES = ("pretrain_loss", "finetune_spam_loss", "finetune_instruct_loss")  # ids in CURVES / dvc.yaml
COMMENT = "comment.md"
SUMMARY = "summary.md"
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def curve_file(metrics_dir: str | Path, plot_id: str) -> Path:
    """Where a metrics directory holds the curve of `plot_id`: `metrics/curves/pretrain.csv` in
    the repository is `<metrics_dir>/curves/pretrain.csv`."""
    ((file, _),) = CURVES[plot_id]["y"].items()
    return Path(metrics_dir) / Path(file).relative_to(METRICS_DIR)


def plot_side_by_side(plot_id: str, sides: list[tuple[str, list[dict] | None]], path: Path) -> None:
    """One PNG: the plot `plot_id` of each side in its own panel, left to right, on shared axes.
    A side without the curve gets an empty panel that says so."""
    defn = CURVES[plot_id]
    ((_, columns),) = defn["y"].items()
    plt = new_figure(path)
    fig, axes = plt.subplots(1, len(sides), figsize=(4.2 * len(sides), 3.2), sharex=True, sharey=True, squeeze=False)
    for ax, (label, rows) in zip(axes[0], sides, strict=True):
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(defn.get("x_label", defn["x"]))
        ax.grid(alpha=0.3)
        if not rows:
            ax.text(0.5, 0.5, "no curve recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        x = [r[defn["x"]] for r in rows]
        for i, column in enumerate(columns):
            ax.plot(x, [r.get(column) for r in rows], linestyle="-" if i == 0 else "-.", label=column.replace("_", " "))
        ax.legend(loc="best", fontsize=8)
    axes[0][0].set_ylabel(defn.get("y_label", ""))
    fig.suptitle(defn.get("title", plot_id), fontsize=11)
    save_figure(plt, fig, path)


def _table(rows: list[Row], base_label: str, head_label: str) -> str:
    """`compare.table` in Markdown, its value columns named after the two sides."""
    header, *body = table(rows, markdown=True).splitlines()  # | metric | old | new | change | gate | status |
    cells = [c.strip() for c in header.strip("|").split("|")]
    cells[1:3] = [_cell(label) + c[3:] for label, c in ((base_label, cells[1]), (head_label, cells[2]))]
    return "\n".join(["| " + " | ".join(cells) + " |", *body])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def comment_markdown(
    rows: list[Row],
    params_diff: str,
    images: list[tuple[str, str]],
    base_label: str,
    head_label: str,
    gate_rows: list[Row] | None = None,
    footer: str = "",
) -> str:
    """The comment's Markdown. `rows` compare base with head; `gate_rows` (default `rows`) are the
    comparison the gate decides on, when it checks against another baseline than base's;
    `images` are (title, file) pairs."""
    gate_rows = rows if gate_rows is None else gate_rows
    failed = any(r.failed for r in gate_rows)
    lines = [f"## {'❌' if failed else '✅'} CI profile: gate {'failed' if failed else 'passed'}", ""]
    lines += [f"**{verdict(gate_rows)}**", "", f"<sub>{method(gate_rows)}</sub>", ""]
    if gate_rows is not rows:
        lines += [
            "This change updates `ci/baseline/`: the gate checks the head against the updated baseline, "
            f"the tables below compare it with `{base_label}`.",
            "",
        ]
    gated = [r for r in rows if r.gate]
    lines += [f"### Gated metrics: `{base_label}` → `{head_label}`", ""]
    lines += [_table(gated, base_label, head_label) if gated else "No gated metrics.", ""]
    changed = [r for r in rows if not r.gate and r.status != "unchanged"]
    if changed:
        lines += [f"<details><summary>{len(changed)} ungated metrics changed</summary>", ""]
        lines += [_table(changed, base_label, head_label), "", "</details>", ""]
    lines += [f"### Params: `{base_label}` → `{head_label}`", ""]
    lines += [params_diff.strip() if params_changed(params_diff) else "No params changed (`dvc params diff`).", ""]
    if images:
        lines += [f"### Loss curves: `{base_label}` (left), `{head_label}` (right)", ""]
        for title, file in images:
            lines += [f"![{title}]({file})", ""]
    if footer:
        lines += [f"<sub>{footer}</sub>", ""]
    return "\n".join(lines)


def params_changed(params_diff: str) -> bool:
    """Whether `dvc params diff --md` output lists a change: with none it prints an empty table
    (its header and the separator line) or nothing."""
    lines = [line for line in params_diff.strip().splitlines() if line.strip()]
    return not (len(lines) <= 2 and all(line.lstrip().startswith("|") for line in lines))


def summary_markdown(comment: str, where: str = "the run's artifact") -> str:
    """The comment for a job summary, which shows no local images: each image becomes a line
    naming its file and `where` it is."""
    return _IMAGE.sub(lambda m: f"*{m.group(1)}: `{m.group(2)}` in {where}*", comment)


def _dirs(side: str | Path | list) -> list[Path]:
    return [Path(d) for d in side] if isinstance(side, (list, tuple)) else [Path(side)]


def write_comment(
    out: str | Path,
    base: str | Path | list,
    head: str | Path | list,
    gates: dict[str, dict[str, Gate]],
    params_diff: str = "",
    base_label: str = "base",
    head_label: str = "head",
    gate_base: str | Path | list | None = None,
    footer: str = "",
    where: str = "the run's artifact",
) -> Path:
    """Write `out/comment.md`, `out/summary.md` and the curves' PNGs; return the comment's path.

    `base` and `head` are metrics directories (their curves in `curves/`), or lists of them, one
    per replicate. `gate_base`, when given, is the baseline the gate checks `head` against (a change
    that updates the committed baseline): when its metrics differ from `base`'s, the verdict is that
    comparison's, and the comment says so."""
    out = Path(out)
    bases, heads = _dirs(base), _dirs(head)
    base, head = bases[0], heads[0]  # the curves drawn: replicate 0's
    if out.exists() and not out.is_dir():
        raise LLMError(f"--comment {out} is a file: give a directory for the comment and its images")
    base_metrics, head_metrics = [read_metrics_dir(d) for d in bases], [read_metrics_dir(d) for d in heads]
    if len(bases) == 1 and len(heads) == 1:  # one run per side: compared as such
        base_metrics, head_metrics = base_metrics[0], head_metrics[0]
    rows = compare(base_metrics, head_metrics, gates)
    gate_rows = None
    if gate_base is not None:
        gate_metrics = [read_metrics_dir(d) for d in _dirs(gate_base)]
        if len(gate_metrics) == 1 and not isinstance(head_metrics, list):
            gate_metrics = gate_metrics[0]
        if gate_metrics != base_metrics:
            gate_rows = compare(gate_metrics, head_metrics, gates)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for plot_id in LOSS_CURVES:
        sides = [(label, read_curve(curve_file(d, plot_id))) for label, d in ((base_label, base), (head_label, head))]
        if not any(rows for _, rows in sides):
            continue
        plot_side_by_side(plot_id, sides, out / f"{plot_id}.png")
        images.append((CURVES[plot_id]["title"], f"{plot_id}.png"))
    md = comment_markdown(rows, params_diff, images, base_label, head_label, gate_rows, footer)
    (out / SUMMARY).write_text(summary_markdown(md, where), encoding="utf-8")
    (out / COMMENT).write_text(md, encoding="utf-8")
    return out / COMMENT
