"""Tokenization throughput: the project's threaded `tokenize_corpus` against tiktoken's gpt2
`encode_ordinary` on one thread, on the same corpus, with each one's peak RSS.

The corpus (`--size-mb`, default 1024) is built in a temporary folder from the two public texts
of sources.yaml (the-verdict, tinyshakespeare; from $LLM_MIRROR when set): documents of 200 to
4,000 consecutive words taken at a random place of the two texts, with their own spacing and line
breaks, 15% of the words replaced by words drawn at random from the texts' vocabulary, each under
a numbered heading (seeded by `--seed`). No two documents or chunks repeat; the words,
punctuation and line structure stay those of English prose and verse.

Each measurement runs in a child process; its peak RSS is the child's `ru_maxrss` (from `wait4`),
and the table also gives the RSS the child had before the timed work (Python, numpy, torch through
`llm.data`, the gpt2 tables):

- `encode_ordinary, 1 thread`: the corpus's 4 MiB chunks (`llm.corpus.text_chunks`: cut where
  GPT-2's pre-tokenizer cannot join them, so the ids equal the whole text's), encoded one after
  another by `encode_ordinary`, each chunk's ids appended to a uint16 file. Not the whole file in
  one call: for 1 GB that is a Python list of about 250 million ints, some 10 GB.
- `tokenize_corpus, N threads`: the project's function as the prepare_text stage calls it (a
  first pass counts the characters, then the threaded encoding), with `train_ratio` 1 so that every
  id lands in train.bin.

The two token files must be byte-identical (checked after every round). Rounds are interleaved as
in the other benchmarks: round r runs both, the first one rotating; MB/s (10^6 bytes of UTF-8 text
per second of the child's timed work) comes from each method's median time.

    .venv/bin/python -m bench.bench_tokenize                                    # 1 GB, writes bench/results/tokenize.md
    .venv/bin/python -m bench.bench_tokenize --size-mb 20 --out /tmp/tokenize.md   # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import operator
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import MIRROR, ROOT, cpu_name, markdown_table, rotated, use_mirrored_tiktoken, write_report

TEXTS = ("the-verdict", "tinyshakespeare")
REPLACED = 0.15  # share of a document's words replaced by random words of the vocabulary
DOC_WORDS = (200, 4000)
METHODS = ("baseline", "project")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def source_texts(folder: Path, mirror: str | None) -> list[str]:
    from llm.pipeline.download import fetch_source
    from llm.pipeline.sources import load_sources

    sources = load_sources(ROOT / "sources.yaml")
    return [fetch_source(sources[name], folder / name, mirror=mirror).read_text(encoding="utf-8") for name in TEXTS]


def build_corpus(dest: Path, size_bytes: int, texts: list[str], seed: int) -> int:
    """Write documents to `dest` until it holds at least `size_bytes` bytes; return its size."""
    pairs = [pair for text in texts for pair in re.findall(r"(\S+)(\s*)", text.strip() + "\n\n")]
    words = np.array([w for w, _ in pairs], dtype=object)
    spaces = np.array([s for _, s in pairs], dtype=object)
    vocab = np.array(sorted(set(words)), dtype=object)
    rng = np.random.default_rng(seed)
    written, i = 0, 0
    with open(dest, "w", encoding="utf-8", newline="") as f:
        while written < size_bytes:
            n = int(rng.integers(*DOC_WORDS))
            start = int(rng.integers(0, len(words) - n))
            doc_words = words[start : start + n].copy()
            swap = rng.random(n) < REPLACED
            doc_words[swap] = vocab[rng.integers(0, len(vocab), int(swap.sum()))]
            doc = f"Document {i}\n\n" + "".join(map(operator.add, doc_words, spaces[start : start + n])) + "\n\n"
            f.write(doc)
            written += len(doc.encode())
            i += 1
    return written


# --- the children ----------------------------------------------------------------------------------
def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat), None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def child(method: str, corpus: Path, out: Path, threads: int) -> dict:
    import resource

    from llm.corpus import text_chunks, tokenize_corpus
    from llm.tokenizer import get_tokenizer

    enc = get_tokenizer()
    enc.encode_ordinary("warm up")
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    busy, cpu = machine_busy_s(), cpu_s()
    start = time.perf_counter()
    if method == "baseline":
        tokens = 0
        with open(out, "wb") as f:
            for piece in text_chunks([corpus]):
                ids = np.asarray(enc.encode_ordinary(piece), dtype=np.uint16)
                ids.tofile(f)
                tokens += ids.size
    else:
        stats = tokenize_corpus([corpus], 1.0, out.parent, progress=False, threads=threads)
        tokens = stats["train_tokens"]
    seconds = time.perf_counter() - start
    cpu = cpu_s() - cpu
    others = None if busy is None else max(0.0, machine_busy_s() - busy - cpu) / seconds
    return {"seconds": seconds, "cpu_s": cpu, "others": others, "tokens": tokens, "rss_ready_kb": rss_ready}


def run_child(method: str, corpus: Path, out: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_tokenize", "--child", method, "--corpus", str(corpus)]
    cmd += ["--child-out", str(out), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"bench_tokenize: the {method} child failed with exit status {proc.returncode}")
    return {**json.loads(stdout), "peak_rss_kb": usage.ru_maxrss}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --- the report ------------------------------------------------------------------------------------
def mib(kb: int) -> str:
    return f"{kb / 1024:,.0f} MiB"


def others(runs: list[dict]) -> str:
    loads = [r["others"] for r in runs if r["others"] is not None]
    return f"{statistics.median(loads):.2f}" if loads else "n/a"


def report(args, size: int, runs: dict[str, list[dict]], identical: bool, total_s: float) -> str:
    import tiktoken

    names = {"baseline": "tiktoken encode_ordinary, 1 thread", "project": f"tokenize_corpus, {args.threads} threads"}
    median = {m: statistics.median(r["seconds"] for r in runs[m]) for m in METHODS}
    rows = []
    for m in METHODS:
        speeds = [size / r["seconds"] / 1e6 for r in runs[m]]
        rows.append(
            [
                names[m],
                f"{size / median[m] / 1e6:.2f}",
                f"{min(speeds):.2f}–{max(speeds):.2f}",
                f"{median['baseline'] / median[m]:.2f}",
                f"{statistics.median(r['cpu_s'] for r in runs[m]) / (size / 1e6):.3f}",
                others(runs[m]),
                mib(max(r["peak_rss_kb"] for r in runs[m])),
                mib(max(r["rss_ready_kb"] for r in runs[m])),
                ", ".join(f"{r['seconds']:.2f}" for r in runs[m]),
            ]
        )
    header = ["method", "MB/s (median)", "min–max MB/s", "× encode_ordinary", "CPU s per MB", "others' load"]
    header += ["peak RSS", "RSS before timing", "runs (s)"]
    lines = [
        "# Tokenization throughput (CPU)",
        "",
        f"- CPU: {cpu_name()}, os.cpu_count() = {os.cpu_count()}, CPUs this process may use = "
        f"{len(os.sched_getaffinity(0))}",
        f"- Python {sys.version.split()[0]}, tiktoken {tiktoken.__version__}, numpy {np.__version__}",
        f"- corpus: {size / 1e6:,.1f} MB of UTF-8 text built from {' and '.join(TEXTS)} (seed {args.seed}); "
        f"{runs['project'][0]['tokens']:,} tokens",
        f"- {args.rounds} interleaved rounds; token files byte-identical in every round: "
        f"{'yes' if identical else 'NO'}",
        "- CPU s per MB: the child's CPU time (every thread) over its timed work, per MB; others' load: the "
        "CPUs the rest of the machine kept busy meanwhile (median over rounds; near 0 on a quiet machine)",
        "",
        markdown_table(header, rows),
        "",
        f"Total run time: {total_s:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from llm.corpus import tokenize_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=float, default=1024, help="corpus size in MB of text (default 1024)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both methods (default 3)")
    p.add_argument("--threads", type=int, default=None, help="tokenize_corpus threads (default: tokenize_threads())")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--tmp-dir", default=None, help="where the corpus and token files go (default: the system's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenize.md"))
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.child_out, args.threads)))
        return 0
    if args.size_mb <= 0 or args.rounds < 1:
        p.error("--size-mb must be > 0 and --rounds >= 1")
    args.threads = args.threads or tokenize_threads()
    if args.threads < 1:
        p.error("--threads must be >= 1")
    use_mirrored_tiktoken()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-", dir=args.tmp_dir) as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        log(f"building a {args.size_mb:g} MB corpus in {tmp} ...")
        mirror = os.environ.get("LLM_MIRROR") or (str(MIRROR) if MIRROR.is_dir() else None)
        texts = source_texts(tmp / "sources", mirror)
        size = build_corpus(corpus, int(args.size_mb * 1e6), texts, args.seed)
        log(f"  {size / 1e6:,.1f} MB in {time.perf_counter() - start:.1f} s")
        outs = {"baseline": tmp / "baseline" / "ids.bin", "project": tmp / "project" / "train.bin"}
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        identical = True
        for r in range(args.rounds):
            for m in rotated(METHODS, r):
                outs[m].parent.mkdir(exist_ok=True)
                result = run_child(m, corpus, outs[m], args.threads)
                runs[m].append(result)
                log(f"  round {r + 1} {m}: {result['seconds']:.2f} s, {size / result['seconds'] / 1e6:.2f} MB/s, "
                    f"CPU {result['cpu_s']:.2f} s, others' load {others([result])}, "
                    f"peak RSS {mib(result['peak_rss_kb'])}")  # fmt: skip
            same = sha256(outs["baseline"]) == sha256(outs["project"])
            identical &= same
            if not same:
                log(f"  round {r + 1}: the token files differ")
    text = report(args, size, runs, identical, time.perf_counter() - start)
    print(text)
    write_report(args.out, text)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
