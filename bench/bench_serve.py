"""`llm serve` under load: N concurrent streaming clients on 127.0.0.1, latency and throughput.

    .venv/bin/python -m bench.bench_serve --model models/pretrain            # writes bench/results/serve.md
    .venv/bin/python -m bench.bench_serve --random mini                      # the mini preset, random weights
    .venv/bin/python -m bench.bench_serve --model models/pretrain --clients 1 --requests 1 --out /tmp/s.md  # smoke

Starts `python -m llm serve --model MODEL --port 0` (the server's defaults: 32 requests at once, decoded
together in one batch, 32 waiting), sends each of the PROMPTS (1 to 17 tokens) alone once (greedy,
`ignore_eos`, --max-tokens): what every answer to that prompt must be. Then for each N in --clients runs
N clients at once, client i sending PROMPTS[i mod 8] --requests times one after another (greedy,
`ignore_eos`, --max-tokens each, so every request costs the same). Per N: requests/s and generated
tokens/s over the wall time of the round, p50/p95 time to first token (the first text chunk) and total
latency per request, errors (anything but a 200 that ends in [DONE]), 503s, and the answers equal to
their prompt's alone. The last round (--over, default 64 clients, one request each) fills the server's
bound (32 + 32): more would be 503s, which are counted. `--random PRESET` serves a model of that preset
with random weights (seed 123), saved to a temporary folder. Bounded in count and time; 127.0.0.1 only.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._common import cpu_name, markdown_table, use_mirrored_tiktoken, write_report
from tests.serve_process import llm_serve

PROMPTS = [  # 1 to 17 tokens: the rows of a batch hold prompts of different lengths
    "Every effort moves you",
    "Hi",
    "The quick brown fox jumps over the lazy dog, and then",
    "Once upon a time",
    "In the beginning the Universe was created. This has made a lot of people very angry",
    "I had always thought Jack Gisburn rather a cheap genius",
    "What",
    "The verdict",
]


async def _one(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    done = False
    text = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    text.append(event["choices"][0]["text"])
                    first = first if first is not None else time.perf_counter() - start
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__}
    return {"status": 200 if done else "incomplete", "ttft": first, "latency": time.perf_counter() - start,
            "tokens": tokens, "prompt": body["prompt"], "text": "".join(text)}  # fmt: skip


def _body(prompt: str, max_tokens: int) -> dict:
    return {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip


async def _round(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(i: int):
            return [await _one(client, _body(PROMPTS[i % len(PROMPTS)], max_tokens)) for _ in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    busy = sum(r["status"] == 503 for r in results)
    return {"clients": clients, "requests": len(results), "ok": ok, "busy": busy,
            "errors": len(results) - len(ok) - busy, "wall": wall}  # fmt: skip


async def _alone(url: str, max_tokens: int) -> dict[str, str]:
    """Each prompt's answer sent alone: what it must be in every round."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return {prompt: (await _one(client, _body(prompt, max_tokens)))["text"] for prompt in PROMPTS}


def _pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _row(r: dict, alone: dict[str, str]) -> list[str]:
    ok = r["ok"]
    ttft = [x["ttft"] * 1000 for x in ok if x["ttft"] is not None]
    lat = [x["latency"] * 1000 for x in ok]
    tokens = sum(x["tokens"] for x in ok)
    same = sum(x["text"] == alone[x["prompt"]] for x in ok)
    ms = (lambda v, q: f"{_pct(v, q):.0f}") if ok else (lambda v, q: "-")
    return [
        str(r["clients"]), str(r["requests"]), f"{len(ok) / r['wall']:.2f}", f"{tokens / r['wall']:.0f}",
        ms(ttft, 50), ms(ttft, 95), ms(lat, 50), ms(lat, 95), str(r["errors"]), str(r["busy"]), f"{same}/{len(ok)}",
    ]  # fmt: skip


def _random_checkpoint(preset: str, folder: str) -> str:
    from llm.checkpoint import save_checkpoint
    from llm.model import PRESETS, GPTModel
    from llm.runtime import set_seed

    set_seed(123)
    return str(save_checkpoint(GPTModel(PRESETS[preset]).eval(), Path(folder) / preset))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/pretrain", help="a language model (default models/pretrain)")
    p.add_argument("--random", metavar="PRESET", help="serve a model of this preset (mini...) with random weights")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per round (default 1,4,16)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per round (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--over", type=int, default=64, help="clients of the last round, one request each (0: none)")
    p.add_argument("--threads", type=int, help="the server's torch threads (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.md"))
    args = p.parse_args(argv)
    use_mirrored_tiktoken()
    rounds = [(int(n), args.requests) for n in args.clients.split(",")]
    if args.over:
        rounds.append((args.over, 1))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = _random_checkpoint(args.random, folder) if args.random else args.model
        env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        with llm_serve("--model", f"bench={model}", env=env) as served:
            asyncio.run(_round(served.url, 1, 1, 4))  # warm-up
            alone = asyncio.run(_alone(served.url, args.max_tokens))
            for clients, requests in rounds:
                result = asyncio.run(_round(served.url, clients, requests, args.max_tokens))
                rows.append(_row(result, alone))
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["clients", "requests", "requests/s", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "latency p50 ms",
              "latency p95 ms", "errors", "503", "answers = alone"]  # fmt: skip
    text = "\n".join([
        f"# `llm serve`: {args.max_tokens} tokens per streamed request, "
        + (f"the {args.random} preset with random weights" if args.random else f"`{args.model}`"),
        "",
        f"- CPU: {cpu_name()}, os.cpu_count() = {os.cpu_count()}, the server's torch threads = "
        + (str(args.threads) if args.threads else "torch's default"),
        "- server defaults: 32 requests at once (one batch of at most 32 rows), 32 waiting"
        + (f"; the last row: {args.over} clients, one request each" if args.over else ""),
        f"- client i sends prompt i mod {len(PROMPTS)} (1 to 17 tokens); answers = alone: the answers equal to "
        "that prompt's sent alone before the rounds",
        "",
        markdown_table(header, rows),
        "",
    ])  # fmt: skip
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
