"""Greedy generation throughput at GPT_CONFIG_124M: the book's `generate` vs the project's (with and
without its KV cache) vs transformers' GPT2LMHeadModel.generate, all on the same weights; then many
prompts at once: `generate_batch` vs transformers' batched generate (left-padded, with an attention mask).

The project's model is built once (seeded, random weights, drop_rate 0, eval mode); the book's
GPTModel loads its state_dict and transformers' GPT-2 gets the same weights by name mapping, so
every row's greedy tokens can be compared with the book's.

The timed runs are interleaved: after one untimed warm-up of every method, round r runs each
method that still has runs to do (`--repeats` for the cached methods, `--uncached-repeats` for the
slow uncached ones), the first method rotating each round, so the machine's drifts in speed hit
every method alike. Each method reports its best run; every run's tokens must equal the book's.

Batched (`--batches`, at `--batch-configs`): 64 prompts of 4 to 16 random tokens (seeded); for each batch
size B the first B prompts, `--batch-new-tokens` greedy tokens each (no eos: every row runs to the end), by
`generate_batch(batch_size=B)`, by transformers' `generate` on the prompts left-padded with an attention
mask, and by `generate` on one prompt after another (the unbatched loop, whose tokens every batched row
must equal), interleaved in `--repeats` rounds as above, best run.

Run from the repository root (the book's code is `tests/book_reference.py`, imported as a module):

    .venv/bin/python -m bench.bench_generate               # full run (~10 min), writes bench/results/generate.md
    .venv/bin/python -m bench.bench_generate --new-tokens 5 --batches 1,2 --batch-new-tokens 3 --batch-configs mini \
        --out /tmp/generate.md                             # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from bench._common import machine_lines, markdown_table, rotated, write_report
from llm.generate import generate, generate_batch
from llm.model import GPT_CONFIG_124M, PRESETS, GPTModel
from llm.runtime import set_seed
from tests import book_reference


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def transformers_peer(model: GPTModel):
    """transformers' GPT2LMHeadModel holding `model`'s weights (Conv1D stores [in, out])."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_embd=cfg["emb_dim"],
            n_layer=cfg["n_layers"],
            n_head=cfg["n_heads"],
            n_positions=cfg["context_length"],
            vocab_size=cfg["vocab_size"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
            activation_function="gelu_new",  # GPT-2's tanh GELU, as the book's
            tie_word_embeddings=False,  # the book's head is a separate matrix
            attn_implementation="sdpa",
        )
    ).eval()
    d = cfg["emb_dim"]
    with torch.no_grad():
        tr = hf.transformer
        tr.wte.weight.copy_(model.tok_emb.weight)
        tr.wpe.weight.copy_(model.pos_emb.weight)
        for ours, theirs in zip(model.trf_blocks, tr.h, strict=True):
            att = ours.att
            theirs.ln_1.weight.copy_(ours.norm1.scale)
            theirs.ln_1.bias.copy_(ours.norm1.shift)
            qkv = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight], dim=0)
            theirs.attn.c_attn.weight.copy_(qkv.T)
            if cfg["qkv_bias"]:
                bias = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])
                theirs.attn.c_attn.bias.copy_(bias)
            else:
                theirs.attn.c_attn.bias.zero_()
            theirs.attn.c_proj.weight.copy_(att.out_proj.weight.T)
            theirs.attn.c_proj.bias.copy_(att.out_proj.bias)
            theirs.ln_2.weight.copy_(ours.norm2.scale)
            theirs.ln_2.bias.copy_(ours.norm2.shift)
            theirs.mlp.c_fc.weight.copy_(ours.ff.layers[0].weight.T)
            theirs.mlp.c_fc.bias.copy_(ours.ff.layers[0].bias)
            theirs.mlp.c_proj.weight.copy_(ours.ff.layers[2].weight.T)
            theirs.mlp.c_proj.bias.copy_(ours.ff.layers[2].bias)
        tr.ln_f.weight.copy_(model.final_norm.scale)
        tr.ln_f.bias.copy_(model.final_norm.shift)
        hf.lm_head.weight.copy_(model.out_head.weight)
    assert hf.lm_head.weight.data_ptr() != tr.wte.weight.data_ptr(), "lm_head must not be tied"
    assert tuple(hf.transformer.h[0].attn.c_attn.weight.shape) == (d, 3 * d)
    # Greedy to the last token: no stopping at <|endoftext|>, as the book's generate(eos_id=None).
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = cfg["vocab_size"] - 1
    return hf


BATCH_CONFIGS = {"124M": GPT_CONFIG_124M, "mini": PRESETS["mini"]}


def batched(name: str, batches: list[int], new_tokens: int, repeats: int, seed: int) -> list[list[str]]:
    """Rows of the batched table for config `name`."""
    cfg = {**BATCH_CONFIGS[name], "drop_rate": 0.0}
    ctx = cfg["context_length"]
    set_seed(seed)
    ours = GPTModel(cfg).eval()
    hf = transformers_peer(ours)
    pad = hf.generation_config.pad_token_id
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 17, (max(batches),), generator=g).tolist()
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist() for n in lengths]

    def loop_run(b: int) -> list[list[int]]:
        return [generate(ours, torch.tensor([p]), new_tokens, ctx)[0, len(p) :].tolist() for p in prompts[:b]]

    def ours_run(b: int) -> list[list[int]]:
        return generate_batch(ours, prompts[:b], new_tokens, ctx, batch_size=b)

    def hf_run(b: int) -> list[list[int]]:
        width = max(lengths[:b])
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts[:b]])
        mask = (torch.arange(width) >= width - torch.tensor(lengths[:b])[:, None]).long()
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, use_cache=True)
        return out[:, width:].tolist()

    impls = {"ours": ours_run, "hf": hf_run, "loop": loop_run}
    runners = {(impl, b): run for b in batches for impl, run in impls.items()}
    for run in impls.values():  # warm-up, untimed
        run(1)
    runs: dict[tuple[str, int], list[tuple[float, list[list[int]]]]] = {key: [] for key in runners}
    for r in range(repeats):
        for key in rotated(list(runners), r):
            t = time.perf_counter()
            out = runners[key](key[1])
            runs[key].append((time.perf_counter() - t, out))
            tok_s = key[1] * new_tokens / runs[key][-1][0]
            log(f"  round {r + 1}: {name} {key[0]:4s} B={key[1]:<3d} {tok_s:8.1f} tok/s")
    rate = {key: key[1] * new_tokens / min(t for t, _ in done) for key, done in runs.items()}
    alone = runs[("loop", max(batches))][0][1]  # each prompt's tokens alone
    labels = {"ours": "ours generate_batch", "hf": "transformers generate, padded", "loop": "ours generate, one by one"}
    rows = []
    for b in batches:
        for impl in impls:
            same = sum(all(out[i] == alone[i] for _, out in runs[(impl, b)]) for i in range(b))
            rows.append([
                name, str(b), labels[impl], f"{rate[(impl, b)]:.1f}", f"{rate[(impl, b)] / rate[(impl, 1)]:.2f}",
                f"{rate[(impl, b)] / rate[('loop', b)]:.2f}", f"{rate[(impl, b)] / rate[('hf', b)]:.2f}", f"{same}/{b}",
            ])  # fmt: skip
    return rows


def single(args) -> list[str]:
    """The report's lines on one sequence: the book's, ours (with and without cache), transformers'."""
    book = book_reference
    cfg = {**GPT_CONFIG_124M, "drop_rate": 0.0}
    ctx = cfg["context_length"]

    log("building models ...")
    set_seed(args.seed)
    ours = GPTModel(cfg).eval()
    book_model = book.GPTModel(cfg)
    book_model.load_state_dict(ours.state_dict())
    book_model.eval()
    hf = transformers_peer(ours)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt_tokens), generator=g)

    with torch.no_grad():
        ref_logits = book_model(prompt)
        diff_ours = (ours(prompt) - ref_logits).abs().max().item()
        diff_hf = (hf(input_ids=prompt).logits - ref_logits).abs().max().item()
    log(f"  max |logits - book's| on the prompt: ours {diff_ours:.2e}, transformers {diff_hf:.2e}")

    mask = torch.ones_like(prompt)
    runners = {
        "book generate (no cache)": lambda n: book.generate(book_model, prompt, n, ctx),
        "ours generate(use_cache=False)": lambda n: generate(ours, prompt, n, ctx, use_cache=False),
        "ours generate(use_cache=True)": lambda n: generate(ours, prompt, n, ctx, use_cache=True),
        "transformers generate(use_cache=True)": lambda n: hf.generate(
            prompt, attention_mask=mask, do_sample=False, max_new_tokens=n, use_cache=True
        ),
    }
    with_cache = {"ours generate(use_cache=True)", "transformers generate(use_cache=True)"}
    repeats = {name: args.repeats if name in with_cache else args.uncached_repeats for name in runners}
    if args.warmup_tokens > 0:
        for run in runners.values():
            run(args.warmup_tokens)
        log(f"  warm-up: {args.warmup_tokens} tokens per method")
    runs = {name: [] for name in runners}  # (seconds, output ids) per timed run, in order
    for r in range(max(repeats.values())):
        for name in rotated(list(runners), r):
            if len(runs[name]) >= repeats[name]:
                continue
            t0 = time.perf_counter()
            out = runners[name](args.new_tokens)
            elapsed = time.perf_counter() - t0
            runs[name].append((elapsed, out))
            n_new = out.shape[1] - prompt.shape[1]
            log(f"  round {r + 1}: {name:40s} {n_new} tokens in {elapsed:6.2f} s = {n_new / elapsed:7.2f} tok/s")
    results = {}
    for name, done in runs.items():
        best, out = min(done, key=lambda run: run[0])
        n_new = out.shape[1] - prompt.shape[1]
        results[name] = {
            "outs": [o for _, o in done],
            "elapsed": best,
            "all": [e for e, _ in done],
            "tok_s": n_new / best,
            "n_new": n_new,
        }

    ref_out = results["book generate (no cache)"]["outs"][0]
    book_tok_s = results["book generate (no cache)"]["tok_s"]
    hf_tok_s = results["transformers generate(use_cache=True)"]["tok_s"]
    rows = []
    for name, r in results.items():
        same = all(o.shape == ref_out.shape and torch.equal(o, ref_out) for o in r["outs"])
        rows.append(
            [
                name,
                str(r["n_new"]),
                str(len(r["all"])),
                f"{r['elapsed']:.2f}",
                ", ".join(f"{e:.2f}" for e in r["all"]),
                f"{r['tok_s']:.2f}",
                f"{r['tok_s'] / book_tok_s:.2f}",
                f"{r['tok_s'] / hf_tok_s:.2f}",
                "yes" if same else "NO",
            ]
        )
    cached = results["ours generate(use_cache=True)"]["tok_s"]
    uncached = results["ours generate(use_cache=False)"]["tok_s"]
    return [
        f"- GPT_CONFIG_124M (context {ctx}, drop_rate 0, eval mode), random weights (seed {args.seed}) "
        "shared by all rows; transformers' GPT2LMHeadModel (sdpa, untied head) gets them by name mapping",
        f"- prompt: {args.prompt_tokens} random token ids; {args.new_tokens} new tokens, greedy, "
        f"batch 1; one untimed warm-up run of {args.warmup_tokens} tokens per row",
        f"- interleaved timing: {args.repeats} timed runs per cached method, {args.uncached_repeats} per "
        "uncached one; each round runs every method with runs left, the first method rotating each round. "
        "tokens/s and the ratios use each method's best (shortest) run.",
        f"- max |logits - book's| on the prompt: ours {diff_ours:.2e}, transformers {diff_hf:.2e}",
        "",
        markdown_table(
            [
                "implementation",
                "new tokens",
                "runs",
                "best seconds",
                "all runs (s)",
                "tokens/s",
                "× book",
                "× transformers",
                "same tokens as book (every run)",
            ],
            rows,
        ),
        "",
        f"Ours cached / ours uncached: {cached / uncached:.2f}×.",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--prompt-tokens", type=int, default=10, help="prompt length (default 10)")
    p.add_argument("--warmup-tokens", type=int, default=3, help="untimed warm-up run length (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per cached method (default 2)")
    p.add_argument("--uncached-repeats", type=int, default=1, help="timed runs per uncached (slow) method (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--batches", default="1,4,16,64", help="batch sizes of the batched table ('' to skip it)")
    p.add_argument("--batch-new-tokens", type=int, default=32, help="tokens per row in the batched table (32)")
    p.add_argument("--batch-configs", default="124M,mini", help="configs of the batched table (124M,mini)")
    p.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                   help="the one-sequence table (default; --no-single: only the batched one)")  # fmt: skip
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.md"))
    args = p.parse_args(argv)
    if args.new_tokens < 1 or args.prompt_tokens < 1:
        p.error("--new-tokens and --prompt-tokens must be >= 1")
    if args.repeats < 1 or args.uncached_repeats < 1:
        p.error("--repeats and --uncached-repeats must be >= 1")

    torch.set_num_threads(args.threads)
    if args.prompt_tokens + args.new_tokens > GPT_CONFIG_124M["context_length"]:
        p.error(f"prompt + new tokens must fit the context of {GPT_CONFIG_124M['context_length']}")
    start = time.perf_counter()
    report = ["# Greedy generation throughput (CPU)", "", *machine_lines(torch.get_num_threads())]
    if args.single:
        report += single(args)
    batches = [int(b) for b in args.batches.split(",") if b]
    if batches:
        rows = []
        for name in args.batch_configs.split(","):
            log(f"batched: {name} ...")
            rows += batched(name, batches, args.batch_new_tokens, args.repeats, args.seed)
        report += [
            "",
            "## Many prompts at once",
            "",
            f"- {max(batches)} prompts of 4 to 16 random token ids, {args.batch_new_tokens} new tokens each, greedy, "
            f"no eos; batch B takes the first B prompts; random weights (seed {args.seed}); each row's best of "
            f"{args.repeats} interleaved runs after an untimed warm-up",
            "- ours generate, one by one: `generate` on the B prompts one after another (no batching); "
            "× B=1: tokens/s over the same implementation's at batch 1; × one by one: over that loop's at the same B; "
            "rows = alone: rows whose tokens equal `generate`'s for that prompt alone, in every run",
            "",
            markdown_table(
                [
                    "config",
                    "batch",
                    "implementation",
                    "tokens/s",
                    "× B=1",
                    "× one by one",
                    "× transformers",
                    "rows = alone",
                ],
                rows,
                left=3,
            ),  # fmt: skip
        ]
    report.append(f"\nTotal run time: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(report) + "\n"
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
