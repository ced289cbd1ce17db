"""Time to quality: how long each training recipe takes to reach the validation loss the book's recipe
reaches in a fixed budget, on tinyshakespeare, in one run.

Every recipe is a set of `-S` values over params.yaml (the pipeline's own keys, so a row of the table is
a `dvc exp run` line) and trains the pretrain stage's model, `llm.model.GPTModel` of `model.*`, with the
pipeline's loop (`llm.trainer.Trainer`) on the same windows of the same split:

- data: tinyshakespeare (sources.yaml; the mirror offline), split 90/10 on characters as the book splits
  the-verdict, GPT-2's tokenizer, windows of `train.max_length` (256) tokens, stride 256. Every recipe
  keeps the tokenizer, so losses are nats per GPT-2 token; the table also gives bits per byte of the
  validation text (loss / ln 2 x tokens / bytes), the unit that would stay comparable if one did not.
- the target: the book's recipe (params.yaml as committed: AdamW at a constant 4e-4, batch 2, fp32, an
  untied head) trains for `--budget` seconds; its validation loss at the end is the target.
- each other recipe trains until its own `train.max_steps` or the budget, whichever comes first; its time
  to target is when its validation loss first reaches the target, interpolated linearly between the two
  evaluations around it (in training seconds and in tokens).
- evaluation: every `--eval-tokens` training tokens, the mean loss over every validation window
  (fp32, eval mode, weighted by tokens): the same number for every recipe. Its time is not counted: the
  clock is the loop's wall time less `History.eval_seconds`. Compilation (`train.compile`) is counted.
- the machine: runtime.threads (2) torch threads; the load average before and after each run is in the
  report: a number measured beside another job says so.

    .venv/bin/python -m bench.bench_recipes                        # every recipe, 180 s budget
    .venv/bin/python -m bench.bench_recipes --recipes book,fast --budget 600
    .venv/bin/python -m bench.bench_recipes --target 5.9 --recipes muon   # against a known target

Writes bench/results/recipes.md (the tables, samples of the book's and the fast recipe's models),
recipes.csv (every evaluation of every recipe) and recipes.png (the curves), and rewrites the record
table in docs/recipes.md between its `recipes` markers. `fast-10min` (the stretch) runs only when named.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import ROOT, cpu_name, markdown_table
from llm.data import TokenWindowDataset
from llm.generate import generate
from llm.loaders import make_loaders
from llm.model import GPTModel
from llm.pipeline.download import fetch_source
from llm.pipeline.params import parse_params
from llm.pipeline.sources import load_sources
from llm.pipeline.validate import read_yaml
from llm.runtime import keep_freed_memory, set_seed, set_threads
from llm.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from llm.trainer import Trainer, TrainingInterrupted

RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "recipes.md"
BEGIN, END = "<!-- recipes:begin -->", "<!-- recipes:end -->"

# Each recipe: the `-S` values it sets over params.yaml. `book` sets nothing: the faithful default.
# The single changes come first (the ablation), then `fast`, what paid put together: batch 4, Muon at its own
# lr with warmup and a cosine decay, bf16, no dropout (docs/recipes.md "What paid"), chosen by measurement.
FAST = {
    "train.batch_size": 4,
    "train.optimizer": "muon",
    "train.lr": 6e-3,  # the middle of 3e-3..8e-3, which reach the target in the same tokens (recipes_sweep.md)
    "train.warmup_steps": 10,
    "train.lr_schedule": "cosine",
    "train.min_lr": 6e-4,
    "train.max_steps": 180,
    "train.precision": "bf16-mixed",
    "model.drop_rate": 0.0,
}
RECIPES: dict[str, dict[str, object]] = {
    "book": {},
    "cosine": {"train.lr": 1e-3, "train.warmup_steps": 20, "train.lr_schedule": "cosine", "train.min_lr": 1e-4,
               "train.max_steps": 390},
    "lr+batch": {"train.batch_size": 8, "train.lr": 2e-3, "train.warmup_steps": 20, "train.lr_schedule": "cosine",
                 "train.min_lr": 2e-4, "train.max_steps": 100},
    "bf16": {"train.precision": "bf16-mixed"},
    "no dropout": {"model.drop_rate": 0.0},
    "tied": {"model.tie_embeddings": True},
    "muon": {"train.optimizer": "muon"},
    "muon+lr": {"train.optimizer": "muon", "train.lr": 4e-3, "train.warmup_steps": 20,
                "train.lr_schedule": "cosine", "train.min_lr": 4e-4, "train.max_steps": 360},
    "compile": {"train.compile": True},
    "fast": FAST,
    # The stretch: the fast recipe with its schedule stretched over about 10 minutes of these 2 cores
    # (1,100 steps of 4 windows, ~1.1M tokens, ~3.7 epochs). Not in the default run: run it alone,
    # `--recipes fast-10min --target T --budget 700 --out bench/results/recipes_10min.md --no-doc`.
    "fast-10min": {**FAST, "train.max_steps": 1100},
}  # fmt: skip
DEFAULT = [name for name in RECIPES if name != "fast-10min"]
SAMPLED = ("book", "fast", "fast-10min")  # whose replicate 0 writes text into the report


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shakespeare(train_ratio: float = 0.9) -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, val ids, val bytes) of tinyshakespeare, split on characters as the book splits its text."""
    src = load_sources(ROOT / "sources.yaml")["tinyshakespeare"]
    cache = Path(os.environ.get("LLM_BENCH_CACHE", "/tmp/llm-bench-recipes"))
    cache.mkdir(parents=True, exist_ok=True)
    text = fetch_source(src, cache).read_text(encoding="utf-8")
    split = int(train_ratio * len(text))
    tokenizer = get_tokenizer()
    ids = [np.array(tokenizer.encode(part, allowed_special={"<|endoftext|>"}), dtype=np.uint16)
           for part in (text[:split], text[split:])]  # fmt: skip
    return ids[0], ids[1], len(text[split:].encode("utf-8"))


def windows(ids: np.ndarray) -> TokenWindowDataset:
    """The windows every recipe trains and is evaluated on: train.max_length tokens, stride the same."""
    window = recipe_params({}).train.max_length
    return TokenWindowDataset(ids, window, window)


def recipe_params(sets: dict[str, object]):
    """params.yaml with `sets` applied, validated as a stage would read it."""
    raw = read_yaml(ROOT / "params.yaml")
    for key, value in sets.items():
        section, name = key.split(".")
        raw[section][name] = value
    return parse_params(raw)


@torch.no_grad()
def val_loss(model: GPTModel, val_set: TokenWindowDataset, batch: int = 16) -> float:
    """Mean next-token loss over every validation window, fp32, weighted by tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(val_set), batch):
        xs, ys = zip(*(val_set[i] for i in range(start, min(start + batch, len(val_set)))), strict=True)
        logits = model(torch.stack(xs).to(device))
        y = torch.stack(ys).to(device)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


def train_recipe(name: str, sets: dict, train_set, val_set, budget: float, eval_tokens: int) -> dict:
    """Train one recipe for `budget` seconds (or its max_steps); its curve of (seconds, tokens, val loss)."""
    params = recipe_params(sets)
    t, replicate = params.train, params.runtime.replicate
    set_threads(params.runtime.threads)
    set_seed(t.seed)  # as the pretrain stage: the model's init, then the data order and dropout
    model = GPTModel(params.model.config())
    tokens_per_step = t.batch_size * t.grad_accum_steps * t.max_length
    loop = dataclasses.replace(
        t.settings(),
        eval_freq=max(1, round(eval_tokens / tokens_per_step)),
        eval_iter=1,  # the loop's own estimate stays cheap: val_loss below is the measure
        num_epochs=10_000,  # the budget or max_steps ends training
    )
    curve: list[dict] = []
    clock = {"start": None}

    def record(history) -> None:
        seconds = time.perf_counter() - clock["start"] - history.eval_seconds
        curve.append({"recipe": name, "replicate": replicate, "step": history.step[-1], "seconds": seconds,
                      "tokens": history.tokens_seen[-1], "val_loss": history.extra["val_full"][-1]})  # fmt: skip
        log(f"  {name}: {seconds:7.1f} s, {history.tokens_seen[-1]:>9,} tokens, val {curve[-1]['val_loss']:.4f}")
        if seconds >= budget:
            clock["budget_spent"] = True
            trainer.request_stop()

    trainer = Trainer(model, make_loaders(train_set, val_set, loop), loop, progress=False, log=lambda m: None,
                      evaluate_fn=lambda m: {"val_full": val_loss(m, val_set)}, on_record=record)  # fmt: skip
    load = os.getloadavg()[0]
    clock["start"] = time.perf_counter()
    try:
        history = trainer.fit()
    except TrainingInterrupted:
        if not clock.get("budget_spent"):  # Ctrl-C or SIGTERM: stop the benchmark, not just this recipe
            raise
        history = trainer.history
    if not curve or curve[-1]["step"] != history.steps:  # the end of max_steps: one last evaluation
        model.eval()
        started = time.perf_counter()
        loss = val_loss(model, val_set)
        history.eval_seconds += time.perf_counter() - started
        seconds = time.perf_counter() - clock["start"] - history.eval_seconds
        curve.append({"recipe": name, "replicate": replicate, "step": history.steps, "seconds": seconds,
                      "tokens": history.total_tokens,
                      "val_loss": loss})  # fmt: skip
    return {"name": name, "sets": sets, "curve": curve, "model": model, "load": (load, os.getloadavg()[0]),
            "tokens_per_sec": history.total_tokens / max(curve[-1]["seconds"], 1e-9)}  # fmt: skip


def reach(curve: list[dict], target: float) -> tuple[float, float] | None:
    """(seconds, tokens) at which the curve first reaches `target`, linear between evaluations."""
    for before, after in zip([None, *curve], curve, strict=False):
        if after["val_loss"] > target:
            continue
        if before is None or before["val_loss"] == after["val_loss"]:
            return after["seconds"], after["tokens"]
        f = (before["val_loss"] - target) / (before["val_loss"] - after["val_loss"])
        return tuple(before[k] + f * (after[k] - before[k]) for k in ("seconds", "tokens"))
    return None


def sample(model: GPTModel, prompt: str, temperature: float) -> str:
    tokenizer = get_tokenizer()
    torch.manual_seed(123)
    idx = text_to_token_ids(prompt, tokenizer)
    out = generate(model.eval(), idx, 60, model.cfg["context_length"], temperature=temperature,
                   top_k=25 if temperature else None)  # fmt: skip
    return token_ids_to_text(out, tokenizer)


def sets_text(sets: dict) -> str:
    if not sets:
        return "(params.yaml as committed)"
    return " ".join(f"-S {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items())


def plot(runs: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["name"] for r in runs))}
    labelled = set()
    for run in runs:
        xs = [p["seconds"] for p in run["curve"]]
        ks = [p["tokens"] / 1e3 for p in run["curve"]]
        ys = [p["val_loss"] for p in run["curve"]]
        style = {"linewidth": 2.2} if run["name"] in SAMPLED else {"linewidth": 1, "alpha": 0.8}
        label = None if run["name"] in labelled else run["name"]  # one entry per recipe, every seed drawn
        labelled.add(run["name"])
        axes[0].plot(xs, ys, label=label, color=colors[run["name"]], **style)
        axes[1].plot(ks, ys, label=label, color=colors[run["name"]], **style)
    for ax, label in zip(
        axes, ("training seconds (evaluations not counted)", "training tokens (thousands)"), strict=True
    ):
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats per token)")
    axes[0].set_ylim(top=min(8.0, max(p["val_loss"] for r in runs for p in r["curve"])))
    axes[1].legend()
    fig.suptitle(f"tinyshakespeare, time to the book's loss after its budget ({target:.3f}, dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spread(values: list[float], fmt: str) -> str:
    """The median, and the min-max of several replicates."""
    mid = format(statistics.median(values), fmt)
    return mid if len(values) == 1 else f"{mid} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def summarize(runs: list[dict], target: float, bpb: float) -> tuple[list[list[str]], dict]:
    """One row per recipe over its replicates: time and tokens to target, the ratio to the book's, and whether
    the recipe's slowest replicate still beats the book's fastest (the difference exceeds the seeds' spread)."""
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    hits = {name: [reach(r["curve"], target) for r in group] for name, group in by_name.items()}
    book = [h[0] for h in hits.get("book", []) if h]
    rows, record = [], {}
    for name, group in by_name.items():
        reached = [h for h in hits[name] if h]
        seconds = [h[0] for h in reached]
        finals = [r["curve"][-1]["val_loss"] for r in group]
        ratio = statistics.median(book) / statistics.median(seconds) if seconds and book else None
        if name == "book" or not seconds or not book:
            beyond = "—"
        elif len(reached) < len(group):
            beyond = "no: a seed missed the target"
        elif len(group) > 1 and len(book) > 1:
            beyond = "yes" if (max(seconds) < min(book) or min(seconds) > max(book)) else "no"
        else:
            beyond = "one seed: unknown"
        missed = "" if len(reached) == len(group) else f", {len(group) - len(reached)} of {len(group)} missed"
        rows.append([
            name, str(len(group)),
            (spread(seconds, ".0f") + missed) if seconds else "not reached",
            spread([h[1] for h in reached], ",.0f") if reached else "—",
            f"{ratio:.2f}x" if ratio else "—", beyond,
            spread(finals, ".3f"), spread([f * bpb for f in finals], ".3f"),
            spread([r["curve"][-1]["seconds"] for r in group], ".0f"),
            spread([r["tokens_per_sec"] for r in group], ",.0f"),
            f"{max(r['load'][0] for r in group):.1f} / {max(r['load'][1] for r in group):.1f}",
            sets_text(group[0]["sets"]),
        ])  # fmt: skip
        record[name] = {"replicates": len(group), "seconds": seconds, "speedup": ratio, "final_loss": finals}
    return rows, record


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds of the book's recipe (default 180)")
    ap.add_argument("--recipes", default=",".join(DEFAULT), help="comma-separated names (book first sets the target)")
    ap.add_argument("--replicates", type=int, default=3, help="seeds (runtime.replicate 0..N-1) of --replicated")
    ap.add_argument("--replicated", default="book,fast", help="the recipes run under every seed; others under one")
    ap.add_argument("--target", type=float, help="a known target loss instead of running the book's recipe first")
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="training tokens between evaluations")
    ap.add_argument("--out", type=Path, default=RESULTS / "recipes.md")
    ap.add_argument("--no-doc", action="store_true", help=f"do not rewrite the record table in {DOC.name}")
    args = ap.parse_args(argv)
    names = args.recipes.split(",")
    unknown = [n for n in names + args.replicated.split(",") if n and n not in RECIPES]
    if unknown:
        raise SystemExit(f"bench_recipes: unknown recipe {unknown[0]!r}; known: {', '.join(RECIPES)}")
    if args.target is None and names[0] != "book":
        raise SystemExit("bench_recipes: the book's recipe runs first to set the target (or pass --target)")
    keep_freed_memory()
    train_ids, val_ids, val_bytes = shakespeare()
    train_set, val_set = windows(train_ids), windows(val_ids)
    log(f"tinyshakespeare: {len(train_ids):,} train / {len(val_ids):,} val tokens, {len(val_set)} val windows")
    bpb = len(val_ids) / val_bytes / math.log(2)  # nats per token -> bits per byte
    runs, target = [], args.target
    for name in names:
        replicates = range(args.replicates if name in args.replicated.split(",") else 1)
        for r in replicates:
            sets = {**RECIPES[name], **({"runtime.replicate": r} if r else {})}
            log(f"{name} (replicate {r}): {sets_text(sets)}")
            run = train_recipe(name, sets, train_set, val_set, args.budget, args.eval_tokens)
            run["sets"] = RECIPES[name]
            if r or name not in SAMPLED:
                run.pop("model")  # the samples are replicate 0's
            runs.append(run)
        if name == "book" and args.target is None:  # the loss every seed of the book's recipe reaches in the budget
            target = max(run["curve"][-1]["val_loss"] for run in runs if run["name"] == "book")
            log(f"target: {target:.4f} (the book's recipe after {args.budget:.0f} s, its worst seed)")
    rows, record = summarize(runs, target, bpb)
    header = ["recipe", "seeds", "s to target", "tokens to target", "× book", "beyond the seeds' spread",
              "final val loss", "bits/byte", "s trained", "tokens/s", "load before / after", "settings"]  # fmt: skip
    table = markdown_table(header, rows)
    now = datetime.date.today().isoformat()
    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    book = any(r["name"] == "book" for r in runs)
    lines = [
        "# Time to the book's validation loss (bench/bench_recipes.py)",
        "",
        f"- {now}; {machine}",
        f"- tinyshakespeare: {len(train_ids):,} train / {len(val_ids):,} val GPT-2 tokens ({val_bytes:,} val bytes); "
        f"model: params.yaml's (mini unless -S model.* says otherwise)",
        f"- target: {target:.4f} nats per token = {target * bpb:.3f} bits per byte"
        + (
            f": the book's recipe after {args.budget:.0f} s of training, the worst of its seeds" if book else " (given)"
        ),
        f"- evaluation every {args.eval_tokens:,} training tokens over all {len(val_set)} validation windows "
        "(not counted in the seconds); time to target interpolated between evaluations; median (min–max) over "
        "seeds (`runtime.replicate`: model init, data order, dropout); × book: the book's median time over the "
        "recipe's; beyond the seeds' spread: every seed of the recipe is faster than every seed of the book's",
        "",
        table,
        "",
        "![curves](recipes.png)",
    ]
    for run in runs:
        if "model" not in run:
            continue
        for temperature in (0.0, 1.0):
            kind = "greedy" if temperature == 0 else "sampled (temperature 1, top-k 25, seed 123)"
            text = sample(run["model"], "ROMEO:", temperature)
            lines += ["", f"{run['name']}, {kind}:", "", "```", text, "```"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(args.out.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["recipe", "replicate", "step", "seconds", "tokens", "val_loss"])
        writer.writeheader()
        for run in runs:
            writer.writerows(run["curve"])
    plot(runs, target, args.out.with_suffix(".png"))
    if not args.no_doc and DOC.exists():
        doc = DOC.read_text(encoding="utf-8")
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            block = "\n".join([BEGIN, "", *lines[2:7], "", table, "", END])
            DOC.write_text(head + block + rest.split(END, 1)[1], encoding="utf-8")
    print("\n".join(lines))
    return {"target": target, "record": record}


if __name__ == "__main__":
    main()
