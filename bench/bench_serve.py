"""`llm serve` under load: N concurrent streaming clients on 127.0.0.1, latency and throughput.

    .venv/bin/python -m bench.bench_serve --model models/pretrain            # writes bench/results/serve.md
    .venv/bin/python -m bench.bench_serve --model models/pretrain --clients 1 --requests 1 --out /tmp/s.md  # smoke

Starts `python -m llm serve --model MODEL --port 0` (the server's defaults: 8 requests in turns, 32 waiting),
then for each N in --clients runs N clients at once, each sending --requests streamed completions one after
another (greedy, `ignore_eos`, --max-tokens each, so every request costs the same). Per N: requests/s and
generated tokens/s over the wall time of the round, p50/p95 time to first token (the first text chunk) and
total latency per request, errors (anything but a 200 that ends in [DONE]) and 503s. The last round (--over,
default 64 clients, one request each) is above the queue bound (8 + 32): its 503s are expected and counted.
Bounded in count and time; 127.0.0.1 only. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench._common import cpu_name, markdown_table, use_mirrored_tiktoken, write_report
from tests.serve_process import llm_serve

PROMPT = "Every effort moves you"


async def _one(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    done = False
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
                elif first is None and event["choices"] and event["choices"][0]["text"]:
                    first = time.perf_counter() - start
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__}
    return {"status": 200 if done else "incomplete", "ttft": first, "latency": time.perf_counter() - start,
            "tokens": tokens}  # fmt: skip


async def _round(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker():
            return [await _one(client, body) for _ in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    busy = sum(r["status"] == 503 for r in results)
    return {"clients": clients, "requests": len(results), "ok": ok, "busy": busy,
            "errors": len(results) - len(ok) - busy, "wall": wall}  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _row(r: dict) -> list[str]:
    ok = r["ok"]
    ttft = [x["ttft"] * 1000 for x in ok if x["ttft"] is not None]
    lat = [x["latency"] * 1000 for x in ok]
    tokens = sum(x["tokens"] for x in ok)
    ms = (lambda v, q: f"{_pct(v, q):.0f}") if ok else (lambda v, q: "-")
    return [
        str(r["clients"]), str(r["requests"]), f"{len(ok) / r['wall']:.2f}", f"{tokens / r['wall']:.0f}",
        ms(ttft, 50), ms(ttft, 95), ms(lat, 50), ms(lat, 95), str(r["errors"]), str(r["busy"]),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/pretrain", help="a language model (default models/pretrain)")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per round (default 1,4,16)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per round (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--over", type=int, default=64, help="clients of the last round, above the queue bound (0: none)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.md"))
    args = p.parse_args(argv)
    use_mirrored_tiktoken()
    rounds = [(int(n), args.requests) for n in args.clients.split(",")]
    if args.over:
        rounds.append((args.over, 1))
    rows = []
    with llm_serve("--model", f"bench={args.model}") as served:
        asyncio.run(_round(served.url, 1, 1, 4))  # warm-up
        for clients, requests in rounds:
            result = asyncio.run(_round(served.url, clients, requests, args.max_tokens))
            rows.append(_row(result))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["clients", "requests", "requests/s", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "latency p50 ms",
              "latency p95 ms", "errors", "503"]  # fmt: skip
    import torch

    text = "\n".join([
        f"# `llm serve`: {args.max_tokens} tokens per streamed request, `{args.model}`",
        "",
        f"- CPU: {cpu_name()}, os.cpu_count() = {os.cpu_count()}, torch threads = {torch.get_num_threads()}",
        "- server defaults: 8 requests in turns, 32 waiting"
        + (f"; the last row ({args.over} clients, one request each) is above that bound" if args.over else ""),
        "",
        markdown_table(header, rows),
        "",
    ])  # fmt: skip
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
