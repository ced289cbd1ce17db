"""How often a batched greedy row differs from `generate` on its prompt alone: 1,000 prompts.

A row of `llm.generate.Batch` runs through matrix products of a different shape than the same prompt alone
(16 rows at a time instead of one), and float32 sums split differently round differently in their last
bits. The argmax can then change only where the two most likely tokens' logits are within that rounding.
This counts it: every prompt is generated alone with `generate` and in batches with `generate_batch`
(greedy, no eos, the same number of new tokens), and the two token lists compared. For each prompt whose
tokens differ it reports the step of the first difference and the gap between the two largest logits
there, in the run alone (a near-tie is a gap of about 1e-5 or less).

    .venv/bin/python -m bench.bench_batch_equal                     # random mini weights, random prompts
    .venv/bin/python -m bench.bench_batch_equal --model models/instruct --prompts instructions  # the pipeline's

Prompts: `random` token ids (4 to 64 of them), or `instructions`: the book's instruction data formatted as
the finetune_instruct stage formats its test set (every entry, then again from the start, up to --count).
Not a test: it takes minutes (1,000 x 32 tokens alone); the result goes to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench._common import MIRROR, machine_lines, markdown_table, use_mirrored_tiktoken, write_report
from llm.generate import generate, generate_batch
from llm.model import PRESETS, GPTModel
from llm.runtime import set_seed


def prompts_of(kind: str, count: int, context: int, seed: int) -> list[list[int]]:
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 65, (count,), generator=g).tolist()
        return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]
    from llm.instruct import format_input
    from llm.tokenizer import encode

    data = json.loads((MIRROR / "instruction-data.json").read_text(encoding="utf-8"))
    return [encode(format_input(data[i % len(data)]))[-context:] for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint (default: the mini preset, random weights)")
    p.add_argument("--prompts", choices=["random", "instructions"], default="random")
    p.add_argument("--count", type=int, default=1000, help="prompts (default 1000)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--batch-size", type=int, default=16, help="generate_batch's rows at once (default 16)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_equal.md"))
    args = p.parse_args(argv)
    use_mirrored_tiktoken()
    start = time.perf_counter()
    if args.model:
        from llm.checkpoint import load_checkpoint

        model, name = load_checkpoint(args.model).eval(), args.model
    else:
        set_seed(args.seed)
        model, name = GPTModel({**PRESETS["mini"], "drop_rate": 0.0}).eval(), "mini preset, random weights"
    context = model.cfg["context_length"]
    prompts = prompts_of(args.prompts, args.count, context, args.seed)
    t0 = time.perf_counter()
    batched = generate_batch(model, prompts, args.new_tokens, context, batch_size=args.batch_size)
    batched_s = time.perf_counter() - t0
    print(f"batched: {batched_s:.0f} s", file=sys.stderr, flush=True)
    differ = []
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), args.new_tokens, context)[0, len(prompt) :].tolist()
        if alone != batched[i]:
            step = next(s for s, (a, b) in enumerate(zip(alone, batched[i], strict=True)) if a != b)
            with torch.no_grad():
                logits = model(torch.tensor([(prompt + alone[:step])[-context:]]))[0, -1]
            top = torch.topk(logits, 2).values
            differ.append((i, step, float(top[0] - top[1])))
            print(f"prompt {i}: differs from step {step}, top-2 gap {differ[-1][2]:.2e}", file=sys.stderr)
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(prompts)} alone, {len(differ)} differ", file=sys.stderr, flush=True)
    alone_s = time.perf_counter() - t0
    rows = [[str(i), str(step), f"{gap:.2e}"] for i, step, gap in differ]
    text = "\n".join([
        f"# Batched greedy rows against `generate` alone: {name}",
        "",
        *machine_lines(torch.get_num_threads()),
        f"- {len(prompts)} {args.prompts} prompts, {args.new_tokens} greedy tokens each (no eos), "
        f"generate_batch with batch_size {args.batch_size} (a finished row's place goes to the next prompt)",
        f"- prompts whose tokens differ from `generate` alone: **{len(differ)} of {len(prompts)}** "
        f"({len(prompts) * args.new_tokens} tokens compared)",
        f"- time: batched {batched_s:.0f} s, alone {alone_s:.0f} s (on a machine shared with other jobs)",
        "",
        *([markdown_table(["prompt", "first differing step", "top-2 logit gap there (alone)"], rows)] if rows else []),
        "",
        f"Total run time: {time.perf_counter() - start:.0f} s.",
    ])  # fmt: skip
    print(text)
    write_report(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
