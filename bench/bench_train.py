"""Training-step throughput: the book's GPTModel vs transformers' GPT-2 vs the project's, on CPU.

One step is forward + cross-entropy + backward + AdamW step. Every row of a config trains on the
same token batches. Within a config all rows are built up front and timed interleaved: round i
runs step i of every row, the first row rotating each round, so that the machine's drifts in
speed (±20-30% over minutes on a shared 2-core box) hit every row alike; each row reports its
median step time and the spread of its steps. The whole set runs twice in one process: phase 1
with glibc's default allocator, phase 2 after `llm.runtime.keep_freed_memory()` (process-wide and
irreversible, so it cannot be undone for a later row); ratios compare rows of the same phase only.

Then a bf16-vs-fp32 check: the project's model at the small config, trained from one init on
the same batches of the-verdict once in fp32 and once under bf16-mixed; the per-step losses are
compared.

Run from the repository root (the book's code is `tests/book_reference.py`, imported as a module):

    .venv/bin/python -m bench.bench_train                  # full run (~8 min), writes bench/results/train.md
    .venv/bin/python -m bench.bench_train --steps 2 --warmup 1 --curve-steps 2 --configs small \\
        --out /tmp/train.md                                # smoke test
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._common import MIRROR, machine_lines, markdown_table, rotated, use_mirrored_tiktoken, write_report
from llm.losses import calc_loss_batch
from llm.model import GPT_CONFIG_124M, GPTModel, flops_per_token
from llm.runtime import keep_freed_memory, set_seed
from llm.trainer import make_optimizer
from tests import book_reference

LR, WEIGHT_DECAY = 4e-4, 0.1  # the book's pretraining optimizer settings (chapter 5)

CONFIGS = {
    # The book's pretraining run (chapter 5): GPT_CONFIG_124M with context 256, batch 2.
    "124M": ({**GPT_CONFIG_124M, "context_length": 256, "drop_rate": 0.1}, 2),
    "small": (
        {
            "vocab_size": 50257,
            "context_length": 256,
            "emb_dim": 256,
            "n_heads": 4,
            "n_layers": 4,
            "drop_rate": 0.1,
            "qkv_bias": False,
        },
        8,
    ),
}

ROWS = (  # (implementation, precision)
    ("book", "fp32"),
    ("transformers", "fp32"),
    ("ours", "fp32"),
    ("ours", "bf16-mixed"),
)

PHASES = {1: "1: glibc default", 2: "2: keep_freed_memory()"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> float:
    """Best FLOP/s of one n x n x n torch.matmul over `reps` tries (after one warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.matmul(a, b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


# --- the three implementations -------------------------------------------------------------------
# Each builder returns one training step, step(x, y) -> loss; the closure keeps model and optimizer.
def build_book(book, cfg, seed):
    set_seed(seed)
    model = book.GPTModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)  # foreach default

    def step(x, y):
        opt.zero_grad()
        loss = book.calc_loss_batch(x, y, model, "cpu")
        loss.backward()
        opt.step()
        return loss

    return step


def build_transformers(cfg, seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    set_seed(seed)
    hf_cfg = GPT2Config(
        n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"],
        n_head=cfg["n_heads"],
        n_positions=cfg["context_length"],
        vocab_size=cfg["vocab_size"],
        resid_pdrop=cfg["drop_rate"],
        embd_pdrop=cfg["drop_rate"],
        attn_pdrop=cfg["drop_rate"],
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(x, y):
        opt.zero_grad()
        logits = model(input_ids=x, use_cache=False).logits  # no KV cache to build when training
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        return loss

    return step


def build_ours(cfg, seed, precision):
    set_seed(seed)  # same construction order as the book's model: the same initial weights
    model = GPTModel(cfg).train()
    opt = make_optimizer(model, LR, WEIGHT_DECAY)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = calc_loss_batch(x, y, model, "cpu", precision)
        loss.backward()
        opt.step()
        return loss

    return step


def build_row(row, book, cfg, seed):
    impl, precision = row
    if impl == "book":
        return build_book(book, cfg, seed)
    if impl == "transformers":
        return build_transformers(cfg, seed)
    return build_ours(cfg, seed, precision)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def time_interleaved(steps: dict, batches, warmup: int, n_steps: int, seed: int) -> dict:
    """Round i runs step i of every row on the same batch; rounds before `warmup` are untimed.

    The row that goes first rotates by one each round (timed round r starts with row r mod k), so
    with `n_steps` a multiple of the number of rows every row holds every position equally often.
    Returns, per row, the timed steps' seconds and minor page faults, in order.
    """
    rows = list(steps)
    out = {row: {"seconds": [], "faults": [], "losses": []} for row in rows}
    for i, (x, y) in enumerate(batches[: warmup + n_steps]):
        gc.collect()  # between rounds, outside every timed step
        for row in rotated(rows, i - warmup):
            torch.manual_seed(seed + i)  # the same dropout-mask stream for every row at step i
            f0 = minor_faults()
            t0 = time.perf_counter()
            loss = steps[row](x, y).item()
            seconds = time.perf_counter() - t0
            faults = minor_faults() - f0
            if i >= warmup:
                out[row]["seconds"].append(seconds)
                out[row]["faults"].append(faults)
                out[row]["losses"].append(loss)
        if i >= warmup:
            r = i - warmup
            order = " ".join(f"{impl}/{prec}={out[(impl, prec)]['seconds'][r]:.2f}s" for impl, prec in rotated(rows, r))
            log(f"    round {r + 1}/{n_steps}: {order}")
        else:
            log(f"    warm-up {i + 1}/{warmup}")
    for row in rows:
        if not all(math.isfinite(v) for v in out[row]["losses"]):
            log(f"  warning: {row} non-finite loss {out[row]['losses']}")
    return out


def run_phase(phase: int, args, book, peaks: dict, results: list) -> None:
    for name in args.configs:
        cfg, batch = CONFIGS[name]
        t = cfg["context_length"]
        tokens = batch * t
        g = torch.Generator().manual_seed(args.seed)
        n = args.warmup + args.steps
        data = torch.randint(0, cfg["vocab_size"], (n, batch, t + 1), generator=g)
        batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
        # All three have the same matmul shapes (tied or not, the head is one vocab x d matmul).
        with torch.device("meta"):
            fpt = flops_per_token(GPTModel(cfg), t)
        t0 = time.perf_counter()
        steps = {row: build_row(row, book, cfg, args.seed) for row in ROWS}
        log(
            f"  phase {phase} {name}: built {len(steps)} rows in {time.perf_counter() - t0:.1f} s "
            f"(max RSS so far {max_rss_gib():.1f} GiB)"
        )
        timing = time_interleaved(steps, batches, args.warmup, args.steps, args.seed)
        del steps
        gc.collect()
        for impl, precision in ROWS:
            secs = timing[(impl, precision)]["seconds"]
            med = statistics.median(secs)
            tok_s = tokens / med
            peak = peaks["bf16"] if precision == "bf16-mixed" else peaks["fp32"]
            row = {
                "config": name,
                "phase": phase,
                "impl": impl,
                "precision": precision,
                "tok_s": tok_s,
                "tok_s_min": tokens / max(secs),
                "tok_s_max": tokens / min(secs),
                "s_step": med,
                "seconds": secs,
                "mfu": fpt * tok_s / peak,
                "faults": sum(timing[(impl, precision)]["faults"]) / len(secs),
                "fpt": fpt,
            }
            results.append(row)
            log(
                f"  phase {phase} {name:5s} {impl:12s} {precision:10s} {tok_s:8.1f} tok/s median "
                f"({row['tok_s_min']:.1f}-{row['tok_s_max']:.1f}; {med:.2f} s/step, "
                f"{row['faults']:.0f} faults/step)"
            )


def results_table(results: list) -> str:
    def ref(row, impl):
        for r in results:
            if (r["config"], r["phase"], r["impl"], r["precision"]) == (
                row["config"],
                row["phase"],
                impl,
                "fp32",
            ):
                return r["tok_s"]
        return float("nan")

    header = [
        "config",
        "phase / allocator",
        "implementation",
        "precision",
        "tokens/s (median)",
        "min–max tokens/s",
        "× book",
        "× transformers",
        "MFU",
        "faults/step",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r["config"],
                PHASES[r["phase"]],
                r["impl"],
                r["precision"],
                f"{r['tok_s']:.1f}",
                f"{r['tok_s_min']:.0f}–{r['tok_s_max']:.0f}",
                f"{r['tok_s'] / ref(r, 'book'):.2f}",
                f"{r['tok_s'] / ref(r, 'transformers'):.2f}",
                f"{100 * r['mfu']:.1f}%",
                f"{r['faults']:,.0f}",
            ]
        )
    return markdown_table(header, rows, left=4)


def step_times_block(results: list) -> str:
    """Every timed step's seconds, per row, in the order the rounds ran."""
    lines = [
        "<details><summary>Per-step times (seconds, timed rounds in order)</summary>",
        "",
        "```",
    ]
    for r in results:
        label = f"{r['config']:5s} phase {r['phase']} {r['impl']:12s} {r['precision']:10s}"
        lines.append(label + " " + " ".join(f"{v:.2f}" for v in r["seconds"]))
    lines += ["```", "", "</details>"]
    return "\n".join(lines)


# --- bf16 vs fp32 loss curves --------------------------------------------------------------------
def curve_batches(text_path: Path, t: int, batch: int, steps: int, seed: int):
    from llm.tokenizer import encode

    ids = torch.tensor(encode(text_path.read_text(encoding="utf-8")))
    n = (len(ids) - 1) // t  # non-overlapping windows (stride = t, as in the book's pretraining)
    if n < batch:
        raise SystemExit(f"{text_path} has only {n} windows of {t} tokens; need {batch}")
    inputs = torch.stack([ids[i * t : (i + 1) * t] for i in range(n)])
    targets = torch.stack([ids[i * t + 1 : (i + 1) * t + 1] for i in range(n)])
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:  # reshuffle each epoch, drop the last partial batch
        order = torch.randperm(n, generator=g)
        for k in range(0, n - batch + 1, batch):
            sel = order[k : k + batch]
            out.append((inputs[sel], targets[sel]))
    return out[:steps], n, len(ids)


def loss_curves(args) -> str:
    cfg, batch = CONFIGS["small"]
    cfg = {**cfg, "drop_rate": args.curve_drop_rate}
    t = cfg["context_length"]
    batches, n_windows, n_tokens = curve_batches(Path(args.text), t, batch, args.curve_steps, args.seed)
    set_seed(args.seed)
    init = {k: v.clone() for k, v in GPTModel(cfg).state_dict().items()}
    curves = {}
    for precision in ("fp32", "bf16-mixed"):
        model = GPTModel(cfg).train()
        model.load_state_dict(init)
        opt = make_optimizer(model, LR, WEIGHT_DECAY)
        torch.manual_seed(args.seed)
        losses = []
        t0 = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = calc_loss_batch(x, y, model, "cpu", precision)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[precision] = losses
        log(f"  curve {precision:10s} {len(losses)} steps in {time.perf_counter() - t0:.1f} s")
        del model, opt
        gc.collect()
    a, b = curves["fp32"], curves["bf16-mixed"]
    diffs = [abs(u - v) for u, v in zip(a, b, strict=True)]
    lines = [
        "## bf16-mixed vs fp32 loss curve",
        "",
        f"The project's GPTModel at the small config (drop_rate {cfg['drop_rate']}), one initial state, "
        f"{len(a)} AdamW steps (lr {LR}, weight decay {WEIGHT_DECAY}) on the same batches: "
        f"{Path(args.text).name} ({n_tokens} tokens, {n_windows} windows of {t}), batch {batch}, "
        "reshuffled every epoch with a fixed seed. Loss of each batch before its update.",
        "",
        markdown_table(
            ["measure", "value"],
            [
                ["max abs diff per step", f"{max(diffs):.4f}"],
                ["mean abs diff per step", f"{sum(diffs) / len(diffs):.4f}"],
                ["first loss fp32 / bf16", f"{a[0]:.4f} / {b[0]:.4f}"],
                ["final loss fp32 / bf16", f"{a[-1]:.4f} / {b[-1]:.4f}"],
                ["final abs diff", f"{diffs[-1]:.4f}"],
            ],
        ),
        "",
        "```",
        "fp32: " + " ".join(f"{v:.3f}" for v in a),
        "bf16: " + " ".join(f"{v:.3f}" for v in b),
        "```",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--steps",
        type=int,
        default=8,
        help=f"timed interleaved rounds, one step of each row per round (default 8; a multiple of {len(ROWS)} "
        "gives every row every starting position equally often)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before them (default 2)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--curve-steps", type=int, default=40, help="steps per loss curve; 0 skips (default 40)")
    p.add_argument("--curve-drop-rate", type=float, default=0.0, help="dropout in the curve check (default 0)")
    p.add_argument("--text", default=str(MIRROR / "the-verdict.txt"), help="text for the loss curves")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all)")
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak (default 2048)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.md"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    use_mirrored_tiktoken()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    book = book_reference
    start = time.perf_counter()

    log("matmul peak ...")
    peaks = {
        "fp32": matmul_peak(torch.float32, args.peak_size, 5),
        "bf16": matmul_peak(torch.bfloat16, args.peak_size, 5),
    }
    log(f"  fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")

    results: list[dict] = []
    log("phase 1: glibc's default allocator")
    run_phase(1, args, book, peaks, results)
    kept = keep_freed_memory()
    log(f"phase 2: keep_freed_memory() -> {kept}")
    run_phase(2, args, book, peaks, results)

    fpts = {}
    for r in results:
        fpts.setdefault(r["config"], r["fpt"])
    cfg_lines = []
    for name in args.configs:
        cfg, batch = CONFIGS[name]
        cfg_lines.append(
            f"- {name}: emb {cfg['emb_dim']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
            f"context {cfg['context_length']}, batch {batch}, drop_rate {cfg['drop_rate']}; "
            f"{fpts[name] / 1e9:.3f} GFLOP per token"
        )
    report = [
        "# Training step throughput (CPU)",
        "",
        *machine_lines(torch.get_num_threads()),
        f"- matmul peak ({args.peak_size}³, best of 5): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s",
        f"- interleaved timing: per config and phase all {len(ROWS)} rows are built first and stay in memory "
        f"(max RSS {max_rss_gib():.1f} GiB); {args.warmup} untimed warm-up + {args.steps} timed rounds, round i "
        "runs step i of every row on the same random token batch, the first row rotating each round; "
        f"AdamW lr {LR}, weight decay {WEIGHT_DECAY}",
        "- tokens/s = tokens per step ÷ the row's median step time; min–max = from its slowest and "
        "fastest timed step. Ratios are of medians of the same config and phase.",
        *cfg_lines,
        "- book: tests/book_reference.py GPTModel + calc_loss_batch, torch.optim.AdamW (foreach); "
        "transformers: GPT2LMHeadModel (sdpa, tied embeddings, dropout matched), cross_entropy on "
        "its logits, torch.optim.AdamW; ours: llm GPTModel + calc_loss_batch + make_optimizer (fused)",
        "- MFU = (6·N_matmul + 12·L·d·T) FLOPs/token × tokens/s ÷ matmul peak (fp32 peak for fp32 "
        "rows, bf16 peak for bf16 rows). Ratios compare rows of the same config and phase.",
        f"- phase 2 ran after keep_freed_memory() (returned {kept}); the setting is process-wide, "
        "so phase-2 rows of every implementation benefit from it",
        "",
        results_table(results),
        "",
        step_times_block(results),
        "",
    ]
    if args.curve_steps > 0:
        if Path(args.text).is_file():
            log("bf16-mixed vs fp32 loss curves ...")
            report += [loss_curves(args), ""]
        else:
            report += [f"(loss-curve check skipped: {args.text} not found)", ""]
    report.append(f"Total run time: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(report) + "\n"
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
