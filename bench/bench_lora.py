"""LoRA against full finetuning and against training the last block only, on both finetuning stages.

Each variant runs the real stage (`python -m stages.finetune_spam` / `stages.finetune_instruct`) in its
own scratch folder holding the checkout's `params.yaml` with the variant's settings, `sources.yaml`,
the downloads `data/raw/` and the pretrain stage's `models/pretrain/` (run `dvc repro` first): the
numbers are the stage's own metrics (test accuracy, ROUGE-L, response loss, parameter counts) and
timings (training seconds; peak RSS of the stage's process). Variants run one after another.

- default profile: the settings of params.yaml (spam: whole model, mean pooling, 3 epochs at 2e-4;
  instructions: 3 epochs at 5e-4), with trainable_blocks 1, or LoRA rank 16 / alpha 16 instead.
- book recipe (spam): the book's chapter-6 settings (last-token pooling, 5 epochs at 5e-5, the last
  block trains) against its appendix-E LoRA (rank 16, alpha 16, same settings), from this pipeline's
  small pretrained model (the book starts from OpenAI's GPT-2 small, which this machine cannot fetch).

    .venv/bin/python -m bench.bench_lora                 # every variant, writes bench/results/lora.md
    .venv/bin/python -m bench.bench_lora --only spam-lora --out /tmp/lora.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, cpu_name, markdown_table, use_mirrored_tiktoken, write_report
from llm.pipeline.validate import parse_yaml

LORA = {"lora": {"rank": 16, "alpha": 16.0}}
BOOK_SPAM = {"pooling": "last", "num_epochs": 5, "lr": 5.0e-5}
# name -> (stage, settings over the stage's section, what it is)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "spam-full": ("finetune_spam", {}, "default: every weight trains"),
    "spam-last-block": ("finetune_spam", {"trainable_blocks": 1}, "default, trainable_blocks 1"),
    "spam-lora": ("finetune_spam", LORA, "default, LoRA r16 a16"),
    "spam-book-last-block": ("finetune_spam", {**BOOK_SPAM, "trainable_blocks": 1}, "book ch. 6: last block"),
    "spam-book-lora": ("finetune_spam", {**BOOK_SPAM, **LORA}, "book app. E: LoRA r16 a16"),
    "instruct-full": ("finetune_instruct", {}, "default: every weight trains"),
    "instruct-lora": ("finetune_instruct", LORA, "default, LoRA r16 a16"),
    "instruct-lora-no-head": (
        "finetune_instruct",
        {"lora": {**LORA["lora"], "targets": ["attention", "feed_forward"]}},
        "default, LoRA r16 a16, not on the head",
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def project(folder: Path, stage: str, settings: dict) -> Path:
    """A scratch project: params.yaml with the variant's settings, the inputs the stage reads."""
    raw = parse_yaml((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in settings.items():
        if isinstance(value, dict):
            raw[stage][key] = {**raw[stage][key], **value}
        else:
            raw[stage][key] = value
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(json.dumps(raw), encoding="utf-8")
    shutil.copy(ROOT / "sources.yaml", folder / "sources.yaml")
    (folder / "data").mkdir()
    (folder / "data" / "raw").symlink_to(ROOT / "data" / "raw")
    (folder / "models").mkdir()
    (folder / "models" / "pretrain").symlink_to(ROOT / "models" / "pretrain")
    return folder


def run(name: str, scratch: Path) -> dict:
    stage, settings, _ = VARIANTS[name]
    folder = project(scratch / name, stage, settings)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log(f"{name}: python -m stages.{stage} ...")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    metrics = json.loads((folder / "metrics" / f"{stage}.json").read_text())
    timings = json.loads((folder / "timings" / f"{stage}.json").read_text())
    model_dir = folder / "models" / stage.removeprefix("finetune_")
    adapter = model_dir / "adapter" / "lora.safetensors"
    sizes = {"model_mb": (model_dir / "model.safetensors").stat().st_size / 1e6,
             "adapter_mb": adapter.stat().st_size / 1e6 if adapter.is_file() else None}  # fmt: skip
    log(f"{name}: done in {time.perf_counter() - started:.0f} s")
    return {"metrics": metrics, "timings": timings, "sizes": sizes}


def row(name: str, result: dict) -> list[str]:
    stage, _, what = VARIANTS[name]
    m, t = result["metrics"], result["timings"]
    n = m["parameters"]
    if stage == "finetune_spam":
        score = f"test accuracy {m['test']['accuracy']:.2%}"
    else:
        score = f"ROUGE-L {m['test']['rouge_l']:.3f}, response loss {m['test']['response_loss']:.3f}"
    return [
        name,
        what,
        f"{n['trainable']:,} ({n['trainable'] / n['total']:.1%})",
        score,
        f"{t['train_seconds']:.0f}",
        f"{t['peak_rss_mib']:,.0f}",
        f"{result['sizes']['adapter_mb']:.1f}" if result["sizes"]["adapter_mb"] else "",
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.md"))
    args = ap.parse_args(argv)
    if not (ROOT / "models" / "pretrain").is_dir():
        raise SystemExit("bench_lora: models/pretrain does not exist: run `dvc repro pretrain` first")
    use_mirrored_tiktoken()
    names = args.only or list(VARIANTS)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as scratch:
        results = {name: run(name, Path(scratch)) for name in names}
    threads = {r["timings"]["threads"] for r in results.values()}
    header = ["variant", "settings", "trainable parameters", "test", "train s", "peak RSS MiB", "adapter MB"]
    text = "\n".join(
        [
            "# LoRA against full finetuning (bench/bench_lora.py)",
            "",
            f"- CPU: {cpu_name()}, os.cpu_count() = {os.cpu_count()}, torch threads = {', '.join(map(str, threads))}",
            "- From the pretrain stage's model (params.yaml's `model` section); each variant is one run of the stage;",
            "  peak RSS is the stage process's, training seconds exclude evaluation; adapter MB is the size of",
            "  `adapter/lora.safetensors` (the merged `model.safetensors` beside it is as large as full finetuning's).",
            "",
            markdown_table(header, [row(name, r) for name, r in results.items()], left=2),
            "",
        ]
    )
    print(text)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
