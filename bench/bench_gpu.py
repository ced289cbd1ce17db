"""Training and generation throughput on one CUDA GPU, at GPT_CONFIG_124M: the check `bench/gpu_check.sh` runs.

Training rows: the project's step (forward, `calc_loss_batch`, backward, `make_optimizer`'s fused AdamW)
on random token batches already on the GPU, in fp32 (TF32 matmuls: `llm.runtime.select_device` turns
them on) and in bf16-mixed, each eagerly and through `torch.compile` (as `train.compile: true` runs the
steps; the first warm-up step compiles). Generation rows: greedy `llm.generate.generate`, 200 new
tokens after a 10-token prompt, batch 1, without and with the KV cache. Rows run one after the other;
a row that fails (out of memory, no C compiler for Triton…) prints its error in its own row and the
next one runs. A row that would start after `--budget-s` seconds is skipped, so that a rented machine's
time limit is not reached: the compiled rows come last.

MFU = `llm.model.flops_per_token` (6·N_matmul + 12·L·d·T) × tokens/s ÷ the card's dense peak from
`DENSE_PEAKS` (bf16 for bf16-mixed rows, TF32 for fp32 rows); a card not in the table prints
"unknown peak". Ratios are against the eager fp32 row (training) and the uncached row (generation) of
the same run.

    .venv/bin/python -m bench.bench_gpu                 # or: bash bench/gpu_check.sh, make gpu-check
    .venv/bin/python -m bench.bench_gpu --steps 3 --warmup 1 --batch 4 --new-tokens 20   # a quick try
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROG = "gpu_check"

# Dense (no structured sparsity) peak TFLOP/s per card, (bf16 with fp32 accumulation, TF32), from NVIDIA's
# datasheets: the sparsity figures halved. Patterns are matched in order against torch.cuda.get_device_name().
DENSE_PEAKS: list[tuple[str, str, float, float]] = [
    (r"H100.*PCIe", "H100 PCIe", 756.0, 378.0),
    (r"H100.*NVL", "H100 NVL", 835.0, 418.0),
    (r"H100", "H100 SXM", 989.0, 494.5),
    (r"H200.*NVL", "H200 NVL", 835.0, 418.0),
    (r"H200", "H200 SXM", 989.0, 494.5),
    (r"A100", "A100", 312.0, 156.0),
    (r"\bL40S\b", "L40S", 362.0, 183.0),
    (r"\bL4\b", "L4", 121.0, 60.0),
    (r"\bA10\b", "A10", 125.0, 62.5),
    (r"RTX A6000", "RTX A6000", 154.8, 77.4),
    (r"RTX 4090", "GeForce RTX 4090", 165.2, 82.6),
    (r"RTX 3090(?! Ti)", "GeForce RTX 3090", 71.0, 35.6),
]


def dense_peak(device_name: str) -> tuple[str, float, float] | None:
    """(card, bf16 peak, TF32 peak) in FLOP/s for a CUDA device name, or None for a card not in DENSE_PEAKS."""
    for pattern, card, bf16, tf32 in DENSE_PEAKS:
        if re.search(pattern, device_name):
            return card, bf16 * 1e12, tf32 * 1e12
    return None


@dataclass
class Row:
    """One line of the table: what ran, and its numbers or its error."""

    kind: str  # "train" or "generate"
    name: str
    precision: str
    tokens_per_s: float | None = None
    mfu: str = ""
    ratio: str = ""
    peak_gib: float | None = None
    note: str = ""
    error: str = ""
    extra: dict = field(default_factory=dict)


def error_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def train_row(cfg: dict, batch: int, precision: str, compiled: bool, args, device: torch.device) -> Row:
    """Tokens/s of the project's training step; the step's losses must stay finite."""
    from llm.losses import calc_loss_batch
    from llm.model import GPTModel
    from llm.runtime import set_seed
    from llm.trainer import make_optimizer

    row = Row("train", "train + torch.compile" if compiled else "train", precision)
    free(device)
    set_seed(args.seed)
    model = GPTModel(cfg).to(device).train()
    opt = make_optimizer(model, 4e-4, 0.1)
    step_model = torch.compile(model) if compiled else model
    t = cfg["context_length"]
    g = torch.Generator(device=device).manual_seed(args.seed)
    data = torch.randint(0, cfg["vocab_size"], (args.warmup + args.steps, batch, t + 1), generator=g, device=device)
    losses = []

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss = calc_loss_batch(data[i, :, :-1], data[i, :, 1:], step_model, device, precision)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    started = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    row.extra["warmup_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    sync(device)
    seconds = time.perf_counter() - started
    if not all(math.isfinite(v) for v in torch.stack(losses).tolist()):
        raise RuntimeError("a training loss is not finite")
    row.tokens_per_s = args.steps * batch * t / seconds
    row.peak_gib = peak_gib(device)
    row.note = f"warm-up {row.extra['warmup_s']:.1f} s"
    return row


def generate_row(cfg: dict, use_cache: bool, args, device: torch.device) -> Row:
    """Tokens/s of greedy generation, batch 1: one warm-up run of a few tokens, then `args.repeats` timed runs."""
    from llm.generate import generate
    from llm.model import GPTModel
    from llm.runtime import set_seed

    row = Row("generate", f"generate, {'KV cache' if use_cache else 'no cache'}", "fp32")
    free(device)
    set_seed(args.seed)
    model = GPTModel({**cfg, "drop_rate": 0.0}).to(device).eval()
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt_tokens), generator=g, device=device)
    context = cfg["context_length"]
    generate(model, prompt, 3, context, use_cache=use_cache)
    best = math.inf
    for _ in range(args.repeats):
        sync(device)
        started = time.perf_counter()
        out = generate(model, prompt, args.new_tokens, context, use_cache=use_cache)
        sync(device)
        best = min(best, time.perf_counter() - started)
    if out.shape[1] != args.prompt_tokens + args.new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - args.prompt_tokens} tokens, not {args.new_tokens}")
    row.tokens_per_s = args.new_tokens / best
    row.peak_gib = peak_gib(device)
    row.note = f"best of {args.repeats}"
    return row


def plan(train_cfg: dict, gen_cfg: dict, args, device: torch.device) -> list[tuple[Row, Callable[[], Row]]]:
    """(placeholder row, how to run it), in the order they run: eager training, generation, then the compiled
    rows, whose first step compiles (the slowest to start; bf16 first)."""

    def train(precision: str, compiled: bool):
        row = Row("train", "train + torch.compile" if compiled else "train", precision)
        return row, lambda: train_row(train_cfg, args.batch, precision, compiled, args, device)

    def gen(use_cache: bool):
        row = Row("generate", f"generate, {'KV cache' if use_cache else 'no cache'}", "fp32")
        return row, lambda: generate_row(gen_cfg, use_cache, args, device)

    return [
        train("fp32", False),
        train("bf16-mixed", False),
        gen(False),
        gen(True),
        train("bf16-mixed", True),
        train("fp32", True),
    ]


def run_rows(planned: list[tuple[Row, Callable[[], Row]]], budget_s: float, log=print) -> list[Row]:
    """Run each row; an exception becomes that row's error, a row past the budget is skipped."""
    started = time.perf_counter()
    done = []
    for placeholder, run in planned:
        label = f"{placeholder.name} ({placeholder.precision})"
        elapsed = time.perf_counter() - started
        if elapsed > budget_s:
            placeholder.error = f"skipped: {elapsed:.0f} s spent, over the budget of {budget_s:.0f} s"
            done.append(placeholder)
            log(f"  {label}: {placeholder.error}")
            continue
        try:
            row = run()
        except Exception as exc:  # one row's failure is that row's error, not the end of the table
            placeholder.error = error_line(exc)
            row = placeholder
        finally:
            torch._dynamo.reset()
        done.append(row)
        log(f"  {label}: {row.error or f'{row.tokens_per_s:,.1f} tokens/s'}")
    return done


def add_ratios_and_mfu(rows: list[Row], flops_per_token: float, peaks: tuple[str, float, float] | None) -> None:
    """MFU against the card's dense peak (training rows); ratios against each kind's baseline row."""
    base = {
        "train": next((r for r in rows if r.name == "train" and r.precision == "fp32"), None),
        "generate": next((r for r in rows if r.name == "generate, no cache"), None),
    }
    for r in rows:
        ref = base[r.kind]
        if r.tokens_per_s is not None and ref is not None and ref.tokens_per_s:
            r.ratio = f"{r.tokens_per_s / ref.tokens_per_s:.2f}"
        if r.kind != "train" or r.tokens_per_s is None:
            continue
        if peaks is None:
            r.mfu = "unknown peak"
        else:
            peak = peaks[1] if r.precision == "bf16-mixed" else peaks[2]
            r.mfu = f"{100 * flops_per_token * r.tokens_per_s / peak:.1f}%"


def results_table(rows: list[Row]) -> str:
    from bench._common import markdown_table

    header = ["row", "precision", "tokens/s", "× baseline", "MFU", "peak GiB", "note"]
    body = []
    for r in rows:
        if r.error:
            body.append([r.name, r.precision, "—", "—", "—", "—", f"error: {r.error}".replace("|", "/")])
            continue
        gib = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "—"
        body.append([r.name, r.precision, f"{r.tokens_per_s:,.1f}", r.ratio, r.mfu or "—", gib, r.note])
    return markdown_table(header, body, left=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="training batch (default 16: 16,384 tokens a step)")
    p.add_argument("--context", type=int, default=1024, help="training sequence length (default 1024)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first; the first compiles (default 3)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--prompt-tokens", type=int, default=10, help="prompt length (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed generation runs, best counts (default 3)")
    p.add_argument("--budget-s", type=float, default=180.0, help="start no row after this many seconds (180)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.md"))
    args = p.parse_args(argv)
    if min(args.batch, args.context, args.steps, args.warmup, args.new_tokens, args.prompt_tokens, args.repeats) < 1:
        p.error("--batch, --context, --steps, --warmup, --new-tokens, --prompt-tokens and --repeats must be >= 1")
    if not torch.cuda.is_available():
        print(
            f"{PROG}: error: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): "
            "this benchmark runs on a GPU only",
            file=sys.stderr,
        )
        return 2

    from bench._common import write_report
    from llm.model import GPT_CONFIG_124M, GPTModel, flops_per_token
    from llm.runtime import select_device

    device = select_device("cuda")  # turns on TF32 for the fp32 rows, as every stage does on CUDA
    limit = GPT_CONFIG_124M["context_length"]
    if args.context > limit or args.prompt_tokens + args.new_tokens > limit:
        p.error(f"--context and --prompt-tokens + --new-tokens must be <= {limit} (GPT_CONFIG_124M's context)")
    train_cfg = {**GPT_CONFIG_124M, "context_length": args.context}
    name = torch.cuda.get_device_name(device)
    peaks = dense_peak(name)
    with torch.device("meta"):
        fpt = flops_per_token(GPTModel(train_cfg), args.context)
    started = time.perf_counter()
    print(f"{PROG}: {name}, torch {torch.__version__}", file=sys.stderr)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = run_rows(plan(train_cfg, GPT_CONFIG_124M, args, device), args.budget_s, log)
    add_ratios_and_mfu(rows, fpt, peaks)
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    peak_line = (
        f"{peaks[0]}: bf16 {peaks[1] / 1e12:.1f}, TF32 {peaks[2] / 1e12:.1f} dense TFLOP/s"
        if peaks
        else "unknown peak (this card is not in bench/bench_gpu.py's DENSE_PEAKS): MFU not computed"
    )
    report = [
        "# Training and generation throughput (GPU)",
        "",
        f"- GPU: {name}; peak used for MFU: {peak_line}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"C compiler for Triton: {compiler or 'none found on PATH'}",
        f"- training: GPT_CONFIG_124M (drop_rate {train_cfg['drop_rate']}), context {args.context}, batch {args.batch} "
        f"({args.batch * args.context:,} tokens a step), random tokens on the GPU, AdamW (fused) lr 4e-4; "
        f"{args.warmup} warm-up + {args.steps} timed steps per row; fp32 rows use TF32 matmuls; "
        f"{fpt / 1e9:.3f} GFLOP per token (6·N_matmul + 12·L·d·T)",
        f"- generation: greedy, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"fp32 (TF32), best of {args.repeats} runs after a warm-up",
        "- × baseline: against train fp32 (eager) for training rows, against generate without cache for generation",
        "",
        results_table(rows),
        "",
        f"Total run time: {time.perf_counter() - started:.0f} s.",
    ]
    text = "\n".join(report) + "\n"
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
