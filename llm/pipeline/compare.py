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
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml.error import YAMLError

from llm.errors import ConfigError, LLMError, first_line, read_text
from llm.pipeline.doc import markdown_table, number, text_table
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
    status: str  # unchanged, changed, improved, within, REGRESSED, new, MISSING, removed, null
    old_null: bool = False  # old is None because the value is null, not absent
    new_null: bool = False

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
    dvc = shutil.which("dvc")
    if dvc is None:
        raise LLMError("dvc is not on PATH: activate the project's .venv, or compare directories with --old/--new")
    # "--": what follows is a revision even if it looks like an option (checked above as well)
    args = [dvc, "metrics", "diff", "--json", "--all", "--", baseline, *([target] if target else [])]
    out = subprocess.run(
        args, capture_output=True, text=True, encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL
    )
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise LLMError(f"{' '.join(args[1:])} failed: {lines[-1] if lines else out.returncode}")
    try:
        diff = json.loads(out.stdout.strip() or "{}")
    except ValueError:
        lines = out.stdout.strip().splitlines()
        raise LLMError(f"{' '.join(args[1:])} printed no JSON: {lines[0][:200] if lines else '(nothing)'}") from None
    if not isinstance(diff, dict) or not all(isinstance(v, dict) for v in diff.values()):
        raise LLMError(f"{' '.join(args[1:])} printed JSON that is not {{file: {{metric: change}}}}")
    return diff


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


def compare(old: Metrics, new: Metrics, gates: dict[str, dict[str, Gate]] | None = None) -> list[Row]:
    gates = gates or {}
    rows = []
    files = sorted(set(old) | set(new) | set(gates))
    for file in files:
        names = sorted(set(old.get(file, {})) | set(new.get(file, {})) | set(gates.get(file, {})))
        for name in names:
            olds, news = old.get(file, {}), new.get(file, {})
            a, b = olds.get(name), news.get(name)
            a_null, b_null = name in olds and a is None, name in news and b is None
            gate = gates.get(file, {}).get(name)
            rows.append(Row(file, name, a, b, gate, _status(a, b, gate, a_null, b_null), a_null, b_null))
    return rows


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
    return f"{delta:+.4g}{pct}"


def table(rows: list[Row], markdown: bool = False, changed_only: bool = False) -> str:
    """The comparison as aligned text, or a Markdown table (e.g. for a CI job summary)."""
    shown = [r for r in rows if not changed_only or r.status != "unchanged" or r.gate]
    header = ["metric", "old", "new", "change", "gate", "status"]
    body = [
        [
            f"{r.file}:{r.name}",
            _num(r.old, r.old_null),
            _num(r.new, r.new_null),
            _change(r),
            r.gate.describe() if r.gate else "",
            r.status,
        ]
        for r in shown
    ]
    if markdown:
        return markdown_table(header, body, right=[False, True, True, True, False, False])
    return text_table(header, body)


def verdict(rows: list[Row]) -> str:
    failed = [r for r in rows if r.failed]
    gated = [r for r in rows if r.gate]
    if not failed:
        return f"OK: {len(gated)} gated metrics within their thresholds"
    names = ", ".join(f"{r.file}:{r.name} ({_why(r)})" for r in failed)
    return f"FAIL: {len(failed)} of {len(gated)} gated metrics regressed or missing: {names}"


def _why(row: Row) -> str:
    if row.status == "MISSING":
        return "missing: null" if row.new_null else "missing: absent"
    return row.status.lower()
