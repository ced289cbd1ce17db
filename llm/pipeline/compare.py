"""Compare two sets of metrics and gate on regressions: what `dvc metrics diff` lacks.

Metrics are `{file: {name: value}}` (nested keys flattened with "."). Gates come from a
versioned YAML file:

    metrics/pretrain.json:
      val.loss: {worse: higher, max_change: 2%}      # may rise at most 2 % of the old value
    metrics/finetune_spam.json:
      test.accuracy: {worse: lower, max_change: 0.01} # may fall at most 0.01 (one point)

A gated metric that got worse by more than its `max_change`, that disappeared, or whose new value
is null (`write_json` writes NaN and infinities as null) fails as MISSING. The metrics of two
revisions or experiments come from `dvc metrics diff` (`dvc_metrics_diff`, then `from_dvc_diff`),
those of two directories from `read_metrics_dir`. Both key a file as DVC does, by its path in the
repository (`metrics/pretrain.json`, as the gates name it), whatever the directories are called.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ruamel.yaml.error import YAMLError

from llm.errors import ConfigError, LLMError, first_line
from llm.files import read_text
from llm.pipeline.doc import markdown_table, number, text_table
from llm.pipeline.stats import ALPHA, Difference, difference, holm
from llm.pipeline.validate import parse_yaml

Metrics = dict[str, dict[str, float | None]]  # None: null in the file
METRICS_DIR = "metrics"  # where the stages write their metrics (dvc.yaml), the prefix of the gates' keys


@dataclass(frozen=True)
class Gate:
    worse: str  # "higher" or "lower": the direction of a regression
    max_change: float  # allowed change in the worse direction
    relative: bool  # max_change is a fraction of the old value ("2%")

    def allowed(self, old: float) -> float:
        return self.max_change * abs(old) if self.relative else self.max_change

    def describe(self) -> str:
        amount = f"{self.max_change * 100:g}%" if self.relative else f"{self.max_change:g}"
        return f"{'rise' if self.worse == 'higher' else 'fall'} <= {amount}"


@dataclass(frozen=True)
class Row:
    file: str
    name: str
    old: float | None
    new: float | None
    gate: Gate | None
    status: str  # unchanged, changed, improved, within, noise, REGRESSED, new, MISSING, removed, null
    old_null: bool = False  # old is None because the value is null, not absent
    new_null: bool = False
    olds: tuple[float, ...] = ()  # each run's value (old and new are their means)
    news: tuple[float, ...] = ()
    diff: Difference | None = None  # with replicates: the means' difference, its interval and p
    p_adjusted: float | None = None  # a gated metric's one-sided p, Holm-adjusted across the gates

    @property
    def failed(self) -> bool:
        return self.status in ("REGRESSED", "MISSING")


def flatten(data: Any, prefix: str = "") -> dict[str, float | None]:
    """Numeric and null leaves of a metrics JSON, nested keys joined with "."; text and lists are skipped."""
    out: dict[str, float | None] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix[:-1]] = float(data)
    elif data is None and prefix:
        out[prefix[:-1]] = None
    return out


def read_metrics_dir(root: str | Path, prefix: str = METRICS_DIR) -> Metrics:
    """Every `*.json` under `root` (a copy of the workspace's `metrics/`, whatever its name), keyed
    by `prefix/` and its path relative to `root`: `metrics/pretrain.json`, as DVC and the gates
    key it, so that `run-a/` and `run-b/` compare file by file."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"metrics directory {root} does not exist")
    out = {}
    for file in sorted(root.rglob("*.json")):
        key = f"{prefix}/{file.relative_to(root).as_posix()}" if prefix else file.relative_to(root).as_posix()
        try:
            out[key] = flatten(json.loads(read_text(file)))
        except ValueError as exc:
            raise ConfigError(f"{file} is not valid JSON: {' '.join(str(exc).split())}") from None
    return out


def check_revision(flag: str, revision: str) -> str:
    """A git revision or experiment name for dvc's command line: never one that reads as an option."""
    if not revision.strip() or revision.startswith("-"):
        raise LLMError(f"{flag} {revision!r}: a revision or experiment name must not be empty or start with '-'")
    return revision


def dvc_metrics_diff(baseline: str, target: str | None = None) -> dict[str, Any]:
    """The parsed `dvc metrics diff --json --all BASELINE [TARGET]` (TARGET: default the workspace)."""
    check_revision("--baseline", baseline)
    if target is not None:
        check_revision("--target", target)
    # "--": what follows is a revision even if it looks like an option (checked above as well)
    args = ["metrics", "diff", "--json", "--all", "--", baseline, *([target] if target else [])]
    diff = _dvc_json(args, "{}", ", or compare directories with --old/--new")
    if not isinstance(diff, dict) or not all(isinstance(v, dict) for v in diff.values()):
        raise LLMError(f"{' '.join(args)} printed JSON that is not {{file: {{metric: change}}}}")
    return diff


def _dvc_json(args: list[str], empty: str, hint: str = "") -> Any:
    """`dvc ARGS`'s stdout parsed as JSON (`empty` when it printed nothing); a missing dvc, a
    failure or output that is not JSON is an LLMError of one line naming the command."""
    dvc = shutil.which("dvc")
    if dvc is None:
        raise LLMError(f"dvc is not on PATH: activate the project's .venv{hint}")
    out = subprocess.run(
        [dvc, *args], capture_output=True, text=True, encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL
    )
    command = " ".join(args)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise LLMError(f"{command} failed: {lines[-1] if lines else out.returncode}")
    try:
        return json.loads(out.stdout.strip() or empty)
    except ValueError:
        lines = out.stdout.strip().splitlines()
        raise LLMError(f"{command} printed no JSON: {lines[0][:200] if lines else '(nothing)'}") from None


def from_dvc_diff(diff: dict[str, Any]) -> tuple[Metrics, Metrics]:
    """(old, new) metrics from `dvc metrics diff --json --all` output.

    DVC drops null metrics and reports a side without the metric as null, so for a numeric
    metric a null side is kept as None (shown as null): null or absent in that revision.
    """
    old: Metrics = {}
    new: Metrics = {}
    for file, entries in diff.items():
        for name, change in entries.items():
            if not isinstance(change, dict):
                continue
            sides = {side: change.get(side) for side in ("old", "new")}
            if not any(_is_number(v) for v in sides.values()):
                continue
            for side, target in (("old", old), ("new", new)):
                value = sides[side]
                if value is None or _is_number(value):
                    target.setdefault(file, {})[name] = None if value is None else float(value)
    return old, new


def revision_runs(baselines: list[str], targets: list[str]) -> tuple[list[Metrics], list[Metrics]]:
    """The metrics of each baseline and each target revision (none: the workspace), one `dvc
    metrics diff` per revision: each baseline against the first target, each target against the
    first baseline."""
    first_target = targets[0] if targets else None
    if len(baselines) == 1 and len(targets) <= 1:
        old, new = from_dvc_diff(dvc_metrics_diff(baselines[0], first_target))
        return [old], [new]
    olds = [from_dvc_diff(dvc_metrics_diff(b, first_target))[0] for b in baselines]
    news = [from_dvc_diff(dvc_metrics_diff(baselines[0], t))[1] for t in targets or [None]]
    return olds, news


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_change(where: str, value: Any) -> tuple[float, bool]:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100, True
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), False
    raise ConfigError(f"{where}.max_change must be a number (absolute) or a percentage like '2%', got {value!r}")


def load_gates(path: str | Path) -> dict[str, dict[str, Gate]]:
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}  # YAML 1.2, as params.yaml: 1e-3 is a number
    except OSError as exc:
        raise ConfigError(f"cannot read thresholds {path}: {exc.strerror}") from None
    except YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must map metrics files to their gated metrics")
    gates: dict[str, dict[str, Gate]] = {}
    for file, metrics in raw.items():
        if not isinstance(metrics, dict):
            raise ConfigError(f"{path}: {file} must map metric names to {{worse, max_change}}")
        for name, spec in metrics.items():
            where = f"{path}: {file}:{name}"
            if not isinstance(spec, dict) or set(spec) != {"worse", "max_change"}:
                raise ConfigError(f"{where} must have exactly the keys worse and max_change, got {spec!r}")
            if spec["worse"] not in ("higher", "lower"):
                raise ConfigError(f"{where}.worse must be higher or lower, got {spec['worse']!r}")
            change, relative = _parse_change(where, spec["max_change"])
            if change < 0:
                raise ConfigError(f"{where}.max_change must be >= 0, got {spec['max_change']!r}")
            gates.setdefault(str(file), {})[str(name)] = Gate(spec["worse"], change, relative)
    return gates


Runs = Metrics | list[Metrics]  # one run, or the replicates of one experiment


def _runs(side: Runs) -> list[Metrics]:
    return side if isinstance(side, list) else [side]


def _values(runs: list[Metrics], file: str, name: str) -> tuple[list[float | None], bool]:
    """The metric's value in each run that has it (None: null), and whether any run has it."""
    found = [run[file][name] for run in runs if name in run.get(file, {})]
    return found, bool(found)


def compare(old: Runs, new: Runs, gates: dict[str, dict[str, Gate]] | None = None, alpha: float = ALPHA) -> list[Row]:
    """Every metric of either side, old against new, gated by `gates`. Each side is one run's
    metrics or a list of replicates' (runs that differ only in their seeds). With one run per side a
    gated metric fails when it got worse by more than its allowance (no spread is known). With
    replicates on either side (and at least two on one), it fails only when it got worse by more than
    its allowance **and** the difference is significant: the one-sided p-value of Student's t-test
    (`llm.pipeline.stats`), Holm-adjusted across the gated metrics, at most `alpha`. A gated metric
    absent, null or NaN in any new run fails (MISSING, or REGRESSED for NaN) as with one run."""
    gates = gates or {}
    olds, news = _runs(old), _runs(new)
    replicated = len(olds) > 1 or len(news) > 1
    rows = []
    files = sorted({f for run in olds + news for f in run} | set(gates))
    for file in files:
        names = sorted({n for run in olds + news for n in run.get(file, {})} | set(gates.get(file, {})))
        for name in names:
            a_all, a_present = _values(olds, file, name)
            b_all, b_present = _values(news, file, name)
            gate = gates.get(file, {}).get(name)
            a_vals = tuple(v for v in a_all if v is not None)
            b_vals = tuple(v for v in b_all if v is not None)
            a = statistics.fmean(a_vals) if a_vals else None
            a_null = a_present and not a_vals
            if gate and len(b_vals) < len(news):  # null or absent in some new run: the gate cannot pass
                b, b_null = None, any(v is None for v in b_all)
            else:
                b, b_null = (statistics.fmean(b_vals) if b_vals else None), b_present and not b_vals
            diff = None
            if a is not None and b is not None and not _has_nan(a_vals + b_vals) and replicated:
                diff = difference(a_vals, b_vals)
            status = _status(a, b, gate, a_null, b_null)
            if status == "unchanged" and set(a_vals) != set(b_vals):
                status = "changed" if gate is None else "within"  # equal means, other runs
            rows.append(Row(file, name, a, b, gate, status, a_null, b_null, a_vals, b_vals, diff))
    return _apply_significance(rows, alpha) if replicated else rows


def _has_nan(values: tuple[float, ...]) -> bool:
    return any(math.isnan(v) for v in values)


def _apply_significance(rows: list[Row], alpha: float) -> list[Row]:
    """Holm across the gated metrics with a spread (one-sided: worse); a gated metric beyond its
    allowance stays REGRESSED only when its adjusted p is at most `alpha`, else it is within noise.
    The ungated metrics that changed are a second family (two-sided), so that among dozens of them
    a few small p-values by luck do not read as changes."""
    out = list(rows)
    spread = [i for i, r in enumerate(rows) if r.diff is not None and r.diff.se is not None]
    gated = [i for i in spread if rows[i].gate]
    for i, p in zip(gated, holm([rows[i].diff.p_worse(rows[i].gate.worse) for i in gated]), strict=True):
        status = "noise" if rows[i].status == "REGRESSED" and p > alpha else rows[i].status
        out[i] = replace(rows[i], status=status, p_adjusted=p)
    free = [i for i in spread if not rows[i].gate and rows[i].status == "changed"]
    for i, p in zip(free, holm([rows[i].diff.p_value() for i in free]), strict=True):
        out[i] = replace(rows[i], p_adjusted=p)
    return out


def _status(old: float | None, new: float | None, gate: Gate | None, old_null: bool, new_null: bool) -> str:
    if new is None:
        if gate:
            return "MISSING"  # null or absent: a gate that cannot be checked fails
        if new_null:
            return "unchanged" if old_null else "null"
        return "removed"
    if old is None:
        return "new"
    if new == old or (math.isnan(new) and math.isnan(old)):
        return "unchanged"
    if gate is None:
        return "changed"
    if math.isnan(new) or math.isnan(old):  # a metric that stopped (or started) being computable
        return "REGRESSED" if math.isnan(new) else "improved"
    worse_by = (new - old) if gate.worse == "higher" else (old - new)
    if worse_by <= 0:
        return "improved"
    return "within" if worse_by <= gate.allowed(old) + 1e-12 else "REGRESSED"


def _num(value: float | None, null: bool = False) -> str:
    if value is None:
        return "null" if null else "-"
    return number(value, digits=6)


def _change(row: Row) -> str:
    if row.old is None or row.new is None or math.isnan(row.old) or math.isnan(row.new):
        return "-"
    delta = row.new - row.old
    pct = f" ({delta / abs(row.old) * 100:+.2f}%)" if row.old else ""
    interval = row.diff.interval() if row.diff else None
    spread = f" ± {_spread((interval[1] - interval[0]) / 2)}" if interval else ""
    return f"{delta:+.4g}{spread}{pct}"


def _side(values: tuple[float, ...], mean: float | None, null: bool) -> str:
    """A side's mean ± standard deviation and its number of runs: `6.216 ± 0.021 (n=3)`."""
    if mean is None:
        return _num(mean, null)
    if len(values) < 2 or math.isnan(mean):
        return f"{_num(mean)} (n={len(values)})"
    return f"{_num(mean)} ± {_spread(statistics.stdev(values))} (n={len(values)})"


def _spread(value: float) -> str:
    """A standard deviation or half-width to two digits, without an exponent: 0.021, 4.8, 498."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _p(value: float) -> str:
    """`p=0.031`, or `p<0.001`."""
    return "p<0.001" if value < 0.001 else f"p={value:.2g}"


def status_text(row: Row, alpha: float = ALPHA) -> str:
    """The verdict on one metric: `REGRESSED: worse, p=0.003`, `within noise, p=0.31`..."""
    if row.diff is None or row.diff.se is None or row.status == "unchanged":
        return row.status
    if row.gate is not None and row.p_adjusted is not None:
        if row.status == "REGRESSED":
            return f"REGRESSED: worse, {_p(row.p_adjusted)}"
        if row.status == "noise":
            return f"within noise, {_p(row.p_adjusted)}"
        return row.status  # within its allowance, or better: the one-sided p of "worse" says nothing more
    if row.status == "changed" and row.p_adjusted is not None:
        p = row.p_adjusted
        return f"changed, {_p(p)}" if p <= alpha else f"within noise, {_p(p)}"
    return row.status


def table(rows: list[Row], markdown: bool = False, changed_only: bool = False) -> str:
    """The comparison as aligned text, or a Markdown table (e.g. for a CI job summary). With
    replicates, each side is its mean ± standard deviation over its n runs, the change carries ± the
    half-width of its 95% interval, and the status the p-value (gated: one-sided, Holm-adjusted)."""
    shown = [r for r in rows if not changed_only or r.status != "unchanged" or r.gate]
    replicated = any(len(r.olds) > 1 or len(r.news) > 1 for r in rows)
    header = ["metric", "old", "new", "change", "gate", "status"]
    if replicated:
        header[1:4] = ["old (mean ± sd)", "new (mean ± sd)", "change ± 95% CI"]
    body = [
        [
            f"{r.file}:{r.name}",
            _side(r.olds, r.old, r.old_null) if replicated else _num(r.old, r.old_null),
            _side(r.news, r.new, r.new_null) if replicated else _num(r.new, r.new_null),
            _change(r),
            r.gate.describe() if r.gate else "",
            status_text(r),
        ]
        for r in shown
    ]
    if markdown:
        return markdown_table(header, body, right=[False, True, True, True, False, False])
    return text_table(header, body)


def runs(rows: list[Row]) -> tuple[int, int]:
    """The most runs behind any metric on each side."""
    return max((len(r.olds) for r in rows), default=0), max((len(r.news) for r in rows), default=0)


def method(rows: list[Row], alpha: float = ALPHA) -> str:
    """How the gate decided, in one sentence."""
    n_old, n_new = runs(rows)
    if n_old <= 1 and n_new <= 1:
        return "one run per side: no spread is known, the allowances alone decide (replicates: runtime.replicate)"
    tested = sum(1 for r in rows if r.gate and r.p_adjusted is not None)
    return (
        f"{n_old} vs {n_new} runs: a gated metric fails when worse by more than its allowance and its one-sided "
        f"p (Student's t-test, Holm-adjusted across {tested} gated metrics) is at most {alpha:g}; an ungated "
        "metric's p is two-sided, Holm-adjusted across the ungated metrics that changed"
    )


def verdict(rows: list[Row]) -> str:
    failed = [r for r in rows if r.failed]
    gated = [r for r in rows if r.gate]
    if not failed:
        noise = sum(1 for r in gated if r.status == "noise")
        beyond = f" ({noise} beyond its allowance but within the seeds' noise)" if noise else ""
        return f"OK: {len(gated)} gated metrics within their thresholds{beyond}"
    names = ", ".join(f"{r.file}:{r.name} ({_why(r)})" for r in failed)
    return f"FAIL: {len(failed)} of {len(gated)} gated metrics regressed or missing: {names}"


def _why(row: Row) -> str:
    if row.status == "MISSING":
        return "missing: null" if row.new_null else "missing: absent"
    if row.p_adjusted is not None:
        return f"worse, {_p(row.p_adjusted)}"
    return row.status.lower()


# --- experiments grouped by params: `llm compare --group-by train.lr` over `dvc exp show --json` ---

IGNORED_PARAMS = ("runtime.replicate", "runtime.threads")
"""What replicates of one experiment may differ in: the seed's replicate index, and the thread count
(which moves the last digits only)."""


@dataclass(frozen=True)
class Member:
    label: str  # the experiment's name, or the commit's
    params: dict[str, Any]  # params.yaml, flattened with "."
    metrics: Metrics
    is_commit: bool = False


@dataclass(frozen=True)
class Group:
    values: tuple[Any, ...]  # of the --group-by keys
    members: tuple[Member, ...]  # one per replicate

    def label(self, keys: list[str]) -> str:
        return ", ".join(f"{k}={_param_text(v)}" for k, v in zip(keys, self.values, strict=True))


def _param_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)


def _flat_params(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat_params(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def dvc_exp_show() -> list[dict[str, Any]]:
    """The parsed `dvc exp show --json` of the repository in the current directory."""
    shown = _dvc_json(["exp", "show", "--json"], "[]")
    if not isinstance(shown, list):
        raise LLMError("dvc exp show --json printed JSON that is not a list of revisions")
    return shown


def _member(label: str, data: Any, is_commit: bool) -> Member | None:
    if not isinstance(data, dict):
        return None
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
    metrics = {
        file: flatten(entry.get("data"))
        for file, entry in (data.get("metrics") or {}).items()
        if isinstance(entry, dict) and isinstance(entry.get("data"), dict)
    }
    if not isinstance(params, dict) or not metrics:
        return None  # a failed, queued or running experiment: nothing to compare yet
    return Member(label, _flat_params(params), metrics, is_commit)


def experiment_members(shown: list[dict[str, Any]]) -> list[Member]:
    """The commits (not the workspace) and their finished experiments in `dvc exp show --json`."""
    members = []
    for entry in shown:
        if not isinstance(entry, dict) or entry.get("rev") == "workspace":
            continue
        commit = _member(str(entry.get("name") or str(entry.get("rev", ""))[:7]), entry.get("data"), True)
        if commit:
            members.append(commit)
        for exp in entry.get("experiments") or []:
            revs = exp.get("revs") or [] if isinstance(exp, dict) else []
            if not revs or (exp.get("executor") or {}).get("state") == "failed":
                continue
            name = exp.get("name") or revs[0].get("name") or str(revs[0].get("rev", ""))[:7]
            found = _member(str(name), revs[0].get("data"), False)
            if found:
                members.append(found)
    return members


def group_experiments(members: list[Member], keys: list[str]) -> tuple[Group, list[Group]]:
    """(the reference group, the others): experiments grouped by the values of `keys`, each group
    one experiment under its replicates. Within a group every other param (but `IGNORED_PARAMS`)
    must be equal, or which runs are replicates of what is ambiguous: an LLMError names the param.
    A replicate index seen twice in a group counts once (an experiment first, then the commit it
    repeats). The reference is the group of the first commit (HEAD), else the first group."""
    if not members:
        raise LLMError("--group-by: dvc exp show lists no finished experiment with metrics")
    for key in keys:
        if not any(key in m.params for m in members):
            raise LLMError(f"--group-by {key}: no experiment has that param (give section.key, e.g. train.lr)")
    ordered = sorted(members, key=lambda m: m.is_commit)  # experiments before the commit they may repeat
    groups: dict[str, list[Member]] = {}
    rest: dict[str, tuple[Member, dict[str, Any]]] = {}
    for m in ordered:
        values = tuple(m.params.get(k) for k in keys)
        sig = json.dumps(values, sort_keys=True, default=str)
        others = {k: v for k, v in m.params.items() if k not in keys and k not in IGNORED_PARAMS}
        if sig in rest:
            first, first_others = rest[sig]
            differ = sorted(k for k in set(first_others) | set(others) if first_others.get(k) != others.get(k))
            if differ:
                raise LLMError(
                    f"--group-by {','.join(keys)}: {first.label} and {m.label} have the same "
                    f"{','.join(keys)} but differ in {differ[0]} ({_param_text(first_others.get(differ[0]))} vs "
                    f"{_param_text(others.get(differ[0]))}): add it to --group-by"
                )
        else:
            rest[sig] = (m, others)
        seen = {x.params.get("runtime.replicate") for x in groups.get(sig, [])}
        if m.params.get("runtime.replicate") not in seen:
            groups.setdefault(sig, []).append(m)
    made = [Group(tuple(g[0].params.get(k) for k in keys), tuple(g)) for g in groups.values()]
    commits = [m for m in members if m.is_commit]
    reference = next((g for g in made if commits and commits[0] in g.members), None)
    if reference is None:
        head = tuple(commits[0].params.get(k) for k in keys) if commits else None
        reference = next((g for g in made if g.values == head), made[0])

    def order(g: Group) -> list[tuple[int, Any]]:
        return [(0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v)) for v in g.values]

    return reference, sorted((g for g in made if g is not reference), key=order)
