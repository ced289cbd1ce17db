"""The search behind bench_recipes' `fast` recipe: candidate recipes compared in tokens to the book's target.

bench_recipes.py times a few recipes against the book's in one run; this script is how `fast` was chosen.
Each candidate is bf16 and no dropout (both paid alone) with warmup and a cosine decay to a tenth of its lr
over about 184,000 tokens, and varies the batch (2, 4, 8), the optimizer (AdamW, Muon) and the lr. One seed
each. The comparison is in tokens to the target (the book's worst seed's loss after 180 s in the bench_recipes run
the sweep followed, 5.6795 by default),
which another job on the cores does not move; the seconds and tokens/s are given too, and the load says how
far to trust them. Candidates run one after another and each appends its curve to a JSON-lines file, so a
sweep can be stopped and extended; the report is rebuilt from that file:

    .venv/bin/python -m bench.sweep_recipes                          # every candidate (about 20 minutes)
    .venv/bin/python -m bench.sweep_recipes --only b4-muon-6e-3,b4-muon-8e-3
    .venv/bin/python -m bench.sweep_recipes --report-only            # rewrite the report from the file

Writes bench/results/recipes_sweep.md from bench/results/recipes_sweep.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from bench import bench_recipes as br
from bench._common import markdown_table

RESULTS = br.RESULTS
COSINE = {"train.precision": "bf16-mixed", "model.drop_rate": 0.0, "train.lr_schedule": "cosine"}


def candidate(batch: int, optimizer: str, lr: float) -> dict[str, object]:
    """bf16, no dropout, warmup then cosine to lr/10 over ~184K tokens (720 windows of 256)."""
    steps = 720 // batch
    return {**COSINE, "train.batch_size": batch, "train.optimizer": optimizer, "train.lr": lr,
            "train.min_lr": round(lr / 10, 10), "train.warmup_steps": 20 if batch == 2 else 10,
            "train.max_steps": steps}  # fmt: skip


CANDIDATES: dict[str, dict[str, object]] = {
    "b2-adamw-1e-3": candidate(2, "adamw", 1e-3),
    "b4-adamw-1.5e-3": candidate(4, "adamw", 1.5e-3),
    "b2-muon-1e-3": candidate(2, "muon", 1e-3),
    "b2-muon-2e-3": candidate(2, "muon", 2e-3),
    "b2-muon-4e-3": candidate(2, "muon", 4e-3),
    "b4-muon-2e-3": candidate(4, "muon", 2e-3),
    "b4-muon-3e-3": candidate(4, "muon", 3e-3),
    "b4-muon-4e-3": candidate(4, "muon", 4e-3),
    "b4-muon-6e-3": candidate(4, "muon", 6e-3),
    "b4-muon-8e-3": candidate(4, "muon", 8e-3),
    "b8-muon-2e-3": candidate(8, "muon", 2e-3),
    "b8-muon-4e-3": candidate(8, "muon", 4e-3),
}


def report(records: list[dict], target: float) -> str:
    rows = []
    for rec in records:
        hit = br.reach(rec["curve"], target)
        by_tokens = {round(p["tokens"] / 1000): p["val_loss"] for p in rec["curve"]}
        at_100k = min(by_tokens, key=lambda k: abs(k - 100))
        rows.append([
            rec["name"], f"{hit[1]:,.0f}" if hit else "not reached", f"{hit[0]:.0f}" if hit else "—",
            f"{by_tokens[at_100k]:.3f} ({at_100k}K)", f"{rec['curve'][-1]['val_loss']:.3f}",
            f"{rec['curve'][-1]['tokens']:,}", f"{rec['tokens_per_sec']:,.0f}",
            f"{rec['load'][0]:.1f} / {rec['load'][1]:.1f}", br.sets_text(rec["sets"]),
        ])  # fmt: skip
    header = ["candidate", "tokens to target", "s to target", "val loss near 100K tokens", "final val loss",
              "tokens trained", "tokens/s", "load before / after", "settings"]  # fmt: skip
    return "\n".join([
        "# The search for the fast recipe (bench/sweep_recipes.py)",
        "",
        f"- target: {target:.4f} nats per token: the book's recipe after 180 s, its worst seed, in the bench_recipes "
        "run the sweep followed (recipes.md holds the latest run's target)",
        f"- {', '.join(sorted({r['date'] for r in records}))}; {br.cpu_name()}, 2 cores, the bench's 2 torch threads",
        "- one seed each; tinyshakespeare, the model, windows and evaluation of bench_recipes.py; read the tokens "
        "to target (what the load does not move) before the seconds",
        "",
        markdown_table(header, rows),
    ]) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated candidates (default: every one)")
    ap.add_argument("--target", type=float, default=5.6795, help="the loss to reach (default 5.6795)")
    ap.add_argument("--budget", type=float, default=140.0, help="training seconds at most per candidate")
    ap.add_argument("--jsonl", type=Path, default=RESULTS / "recipes_sweep.jsonl")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from --jsonl, train nothing")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"sweep_recipes: unknown candidate {unknown[0]!r}; known: {', '.join(CANDIDATES)}")
    if not args.report_only:
        from llm.runtime import keep_freed_memory

        keep_freed_memory()
        train_ids, val_ids, _ = br.shakespeare()
        train_set, val_set = br.windows(train_ids), br.windows(val_ids)
        for name in names:
            run = br.train_recipe(name, CANDIDATES[name], train_set, val_set, args.budget, 16_384)
            record = {k: run[k] for k in ("name", "sets", "curve", "load", "tokens_per_sec")}
            record["date"] = datetime.date.today().isoformat()
            with open(args.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    records = [json.loads(line) for line in args.jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = {name: i for i, name in enumerate(CANDIDATES)}
    latest = {rec["name"]: rec for rec in records if rec["name"] in order}  # a rerun replaces the earlier one
    text = report(sorted(latest.values(), key=lambda r: order[r["name"]]), args.target)
    out = args.jsonl.with_suffix(".md")
    out.write_text(text, encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
