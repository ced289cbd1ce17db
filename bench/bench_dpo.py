"""A DPO epoch of the finetune_dpo stage's code against the book's notebook loop, same settings, one run.

Both sides tune the same starting weights (the instruction stage's `models/instruct` when it exists,
else a model of the default profile's shape with seeded random weights: speed does not depend on the
weights) on the same pairs of the book's preference data, with the notebook's settings: batch 8, beta
0.1, AdamW at lr 5e-6 and weight decay 0.01, an evaluation every 5 steps on 5 batches of each split,
dropout 0 (the notebook's GPT-2 has none), the same seed, so the same data order:

- book: `train_model_dpo_simple` of the notebook (tests/book_reference.py) with the book's GPTModel:
  per step, two policy passes (chosen, rejected) and two reference passes; evaluations run the reference too.
- stage: what `stages/finetune_dpo.py` runs: the reference's log-probabilities cached once per pair
  (`llm.dpo.cached_reference`, its time counted in the epoch), then `llm.trainer.Trainer` with
  `llm.dpo.DPOLoss(joint=True)`: one policy pass over chosen and rejected together per step.

The epochs interleave (book, stage, then stage, book, ...): a slow minute slows one epoch of each.
Each side's tracked losses and rewards are checked equal (to 1e-4) before any time is reported.

    .venv/bin/python -m bench.bench_dpo                       # 160 training pairs, 3 rounds
    .venv/bin/python -m bench.bench_dpo --pairs 935 --rounds 1 --out /tmp/dpo.md
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader, Subset

from bench._common import ROOT, machine_lines, markdown_table, rotated, use_mirrored_tiktoken, write_report


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def starting_state(cfg: dict) -> tuple[dict, dict, str]:
    """(config, weights, where they came from)."""
    from llm.checkpoint import read_checkpoint
    from llm.model import GPTModel

    instruct = ROOT / "models" / "instruct"
    if (instruct / "model.safetensors").is_file():
        ckpt = read_checkpoint(instruct)
        return {**ckpt.cfg, "drop_rate": 0.0}, ckpt.state, "models/instruct"
    torch.manual_seed(123)
    model = GPTModel({**cfg, "drop_rate": 0.0})
    return model.cfg, model.state_dict(), "random weights (no models/instruct: run `dvc repro finetune_instruct`)"


def run_book(cfg, state, train, val, settings, seed):
    from tests import book_reference as book

    policy, reference = book.GPTModel(cfg), book.GPTModel(cfg)
    policy.load_state_dict(state, strict=False)
    reference.load_state_dict(state, strict=False)
    reference.eval()
    collate = functools.partial(book.dpo.custom_collate_fn, allowed_max_length=settings["max_length"])
    torch.manual_seed(seed)
    train_loader = DataLoader(
        train, batch_size=settings["batch_size"], shuffle=True, drop_last=True, collate_fn=collate
    )
    val_loader = DataLoader(val, batch_size=settings["batch_size"], shuffle=False, collate_fn=collate)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    started = time.perf_counter()
    tracking = book.dpo.train_model_dpo_simple(
        policy, reference, train_loader, val_loader, optimizer, 1, settings["beta"], settings["eval_freq"],
        settings["eval_iter"], "Every effort moves you", _tokenizer(),
    )  # fmt: skip
    return time.perf_counter() - started, tracking


def run_stage(cfg, state, train, val, settings, seed):
    from llm.book.ch07_dpo import tracking
    from llm.dpo import DPOLoss, cached_reference, collate_with_reference, count_pairs
    from llm.loaders import make_loaders
    from llm.model import GPTModel
    from llm.settings import LoopSettings
    from llm.trainer import Trainer

    model = GPTModel(cfg)
    model.load_state_dict(state)
    collate = functools.partial(collate_with_reference, allowed_max_length=settings["max_length"])
    started = time.perf_counter()
    sets = [cached_reference(model, s, collate, settings["batch_size"], "cpu") for s in (train, val)]
    loop = LoopSettings(num_epochs=1, batch_size=settings["batch_size"], lr=settings["lr"],
                        weight_decay=settings["weight_decay"], eval_freq=settings["eval_freq"],
                        eval_iter=settings["eval_iter"], device="cpu")  # fmt: skip
    torch.manual_seed(seed)
    loaders = make_loaders(*sets, loop, collate)
    trainer = Trainer(model, loaders, loop, loss_fn=DPOLoss(settings["beta"], joint=True), count_fn=count_pairs,
                      progress=False, log=lambda m: None)  # fmt: skip
    history = trainer.fit()
    return time.perf_counter() - started, tracking(history)


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from llm.tokenizer import get_tokenizer

        _TOKENIZER = get_tokenizer()
    return _TOKENIZER


def assert_equal(book: dict, stage: dict, tolerance: float = 1e-4) -> float:
    """The largest difference between the two sides' tracked numbers; raises above `tolerance`."""
    worst = 0.0
    for key, values in book.items():
        if len(values) != len(stage[key]):
            raise SystemExit(f"{key}: {len(values)} evaluations in the book's loop, {len(stage[key])} in the stage's")
        for a, b in zip(values, stage[key], strict=True):
            worst = max(worst, abs(a - b))
    if worst > tolerance:
        raise SystemExit(f"the stage's losses and rewards differ from the book's by {worst:.2e} (> {tolerance:g})")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=160, help="training pairs of the epoch (the book's split: 935)")
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each side, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo.md"))
    args = parser.parse_args(argv)
    use_mirrored_tiktoken()
    torch.set_num_threads(args.threads)

    from llm.config import PRESETS
    from llm.dpo import PreferenceDataset, load_preferences, usable_pairs
    from llm.instruct import split_instructions
    from llm.pipeline.download import fetch_source
    from llm.pipeline.sources import load_sources

    folder = ROOT / "data" / "raw" / "preferences"
    if not folder.is_dir():
        fetch_source(load_sources(ROOT / "sources.yaml")["preferences"], folder)  # LLM_MIRROR when set
    data = load_preferences(next(folder.iterdir()))
    train_data, _, val_data = split_instructions(data, 0.85, 0.1)  # the notebook's split
    tokenizer = _tokenizer()
    cfg, state, source = starting_state(dict(PRESETS["mini"]))
    context = cfg["context_length"]  # the notebook cuts pairs at 1024 tokens; this model's context is shorter
    train_set, val = (PreferenceDataset(d, tokenizer) for d in (train_data, val_data))
    train = Subset(train_set, usable_pairs(train_set, context, True)[: args.pairs])  # pairs with an answer token
    val = Subset(val, usable_pairs(val, context, True))
    settings = {"batch_size": 8, "beta": 0.1, "lr": 5e-6, "weight_decay": 0.01, "eval_freq": 5, "eval_iter": 5,
                "max_length": context}  # fmt: skip

    sides = {"book": run_book, "stage": run_stage}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    tracked = {}
    for r in range(args.rounds):
        for name in rotated(list(sides), r):
            s, tracking = sides[name](cfg, copy.deepcopy(state), train, val, settings, seed=123)
            seconds[name].append(s)
            tracked[name] = tracking
            log(f"round {r + 1}: {name} {s:.1f} s, last train loss {tracking['train_losses'][-1]:.5f}")
    worst = assert_equal(tracked["book"], tracked["stage"])

    steps = len(train) // settings["batch_size"]
    book_median = statistics.median(seconds["book"])
    rows = []
    for name, label in (("book", "book: `train_model_dpo_simple`"), ("stage", "stage: cached reference, joint pass")):
        median = statistics.median(seconds[name])
        rows.append([label, f"{median:.1f}", f"{min(seconds[name]):.1f}-{max(seconds[name]):.1f}",
                     f"{median / steps * 1000:.0f}", f"{book_median / median:.2f}x"])  # fmt: skip
    table = markdown_table(["code", "epoch (s, median)", "range (s)", "ms / step", "speed-up"], rows)
    text = "\n".join([
        f"# A DPO epoch: {len(train)} pairs ({steps} steps of 8), {len(val)} validation pairs, {args.rounds} rounds",
        "",
        f"- starting weights: {source}; model {cfg['n_layers']} layers x {cfg['emb_dim']}, context "
        f"{cfg['context_length']}; dropout 0",
        "- settings: the notebook's (batch 8, beta 0.1, AdamW lr 5e-6 wd 0.01, eval every 5 steps on 5 batches)",
        f"- equal losses: the tracked losses and rewards of both sides agree to {worst:.1e}",
        *machine_lines(torch.get_num_threads()),
        "",
        table,
        "",
    ])  # fmt: skip
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
