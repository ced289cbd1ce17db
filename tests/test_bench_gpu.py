"""bench/gpu_check.sh on a machine without CUDA, and bench/bench_gpu.py's rows, table and peaks run on the CPU
with a tiny model (what the GPU run measures is not measured here)."""

import functools
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bench import bench_gpu
from llm.model import GPTModel, flops_per_token
from tests.conftest import ROOT, tiny_cfg


def test_gpu_check_without_cuda_exits_2_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # no GPU, even on a machine with one
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("gpu_check: error: no CUDA device"), out.stderr


@pytest.mark.parametrize(
    "name, card",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
        ("NVIDIA A10G", None),
        ("NVIDIA GeForce RTX 3090 Ti", None),
        ("Tesla T4", None),
    ],
)
def test_dense_peaks_by_card_name_and_no_guess_for_an_unknown_card(name, card):
    found = bench_gpu.dense_peak(name)
    assert (found[0] if found else None) == card
    if found:
        assert found[1] > found[2] > 0  # bf16 twice TF32 on every listed card


CFG = tiny_cfg(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.1)
ARGS = SimpleNamespace(batch=2, steps=2, warmup=1, seed=0, new_tokens=4, prompt_tokens=3, repeats=1)


def test_every_row_runs_on_cpu_and_a_failing_or_late_row_is_only_that_rows_error(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))  # no C compiler
    cpu = torch.device("cpu")
    planned = bench_gpu.plan(CFG, CFG, ARGS, cpu)
    assert [(r.name, r.precision) for r, _ in planned] == [
        ("train", "fp32"),
        ("train", "bf16-mixed"),
        ("generate, no cache", "fp32"),
        ("generate, KV cache", "fp32"),
        ("train + torch.compile", "bf16-mixed"),
        ("train + torch.compile", "fp32"),
    ]

    def fails():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB\nmore detail")

    planned.insert(1, (bench_gpu.Row("train", "broken", "fp32"), fails))
    rows = bench_gpu.run_rows(planned, budget_s=600, log=lambda m: None)
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB"  # the first line only
    assert [r.error for r in rows] == ["", oom] + [""] * 5
    assert all(r.tokens_per_s > 0 for r in rows if not r.error)
    with torch.device("meta"):
        fpt = flops_per_token(GPTModel(CFG), CFG["context_length"])
    bench_gpu.add_ratios_and_mfu(rows, fpt, None)
    assert rows[0].ratio == "1.00" and rows[3].ratio == "1.00"  # the baselines: train fp32, generate without cache
    assert [r.mfu for r in rows if r.kind == "train" and not r.error] == ["unknown peak"] * 4
    table = bench_gpu.results_table(rows)
    assert table.count("\n") == 1 + len(rows) and "| broken | fp32 | — |" in table and "unknown peak" in table

    bench_gpu.add_ratios_and_mfu(rows, fpt, ("card", 2e9, 1e9))
    assert rows[0].mfu == f"{100 * fpt * rows[0].tokens_per_s / 1e9:.1f}%"  # fp32 rows: the TF32 peak
    assert rows[2].mfu == f"{100 * fpt * rows[2].tokens_per_s / 2e9:.1f}%"  # bf16-mixed: the bf16 peak

    late = bench_gpu.run_rows(bench_gpu.plan(CFG, CFG, ARGS, cpu), budget_s=-1, log=lambda m: None)
    assert all(r.error.startswith("skipped: ") and "over the budget of -1 s" in r.error for r in late)
