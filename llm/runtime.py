"""Process-level settings: device choice (and TF32 on CUDA), precision, seeding, and glibc's allocator."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import random
import re

import numpy as np
import torch

from llm.choices import DEVICE_PATTERN, PRECISIONS
from llm.errors import LLMError


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit name must be available.

    A CUDA device also turns on TF32 for fp32 matmuls (`use_tf32`), for the whole process.
    """
    device = _device(name)
    if device.type == "cuda":
        use_tf32()
    return device


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(DEVICE_PATTERN, name):  # the same names params.yaml's device allows
        raise LLMError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LLMError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def use_tf32() -> None:
    """Let fp32 matmuls on CUDA run on TF32 tensor cores (Ampere and newer; older cards ignore it).

    TF32 keeps fp32's range with a 10-bit mantissa in the matmul inputs; weights, activations and
    accumulation stay fp32. Set with `torch.set_float32_matmul_precision("high")` rather than only the
    per-backend `torch.backends.cuda.matmul.fp32_precision`, which leaves the process-wide getter
    (read by inductor's autotuning) raising on mixed settings.
    """
    torch.set_float32_matmul_precision("high")


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; to CUDA without waiting (`non_blocking`), so that the copy of a pinned
    batch (the Trainer's loaders pin them on CUDA) overlaps the work already queued on the GPU."""
    device = torch.device(device)
    return tensor.to(device, non_blocking=device.type == "cuda")


def autocast(device: torch.device, precision: str):
    """Context for the forward pass: fp32 as is, or bf16 autocast (weights stay fp32)."""
    if precision not in PRECISIONS:
        raise LLMError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def set_threads(threads: int) -> int:
    """torch's CPU threads for this process (`runtime.threads`; 0 leaves torch's default); returns the count.

    On CPU the count decides the bits: torch splits a sum (a matmul, a reduction, a gradient) into one
    partial sum per thread, so another count adds the same numbers in another order and training ends
    with other last digits (a step of a 1-layer model already differs between 1, 2 and 3 threads). The
    same count gives the same bits in every process, however busy the machine: the split does not depend
    on the load, and no CPU kernel used here is nondeterministic (`torch.use_deterministic_algorithms`
    changes nothing). torch's default, one thread per core or OMP_NUM_THREADS, therefore gives every
    machine its own numbers; a fixed count gives every machine of the same kind (CPU, torch build) the
    same ones (`machine`; tests/test_runtime.py).
    """
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine() -> dict[str, int | str]:
    """What besides code, data and params decides the bits of a run on CPU, for its timings file: torch's
    threads (`set_threads`) and the vector instructions its kernels use (`AVX512`, `AVX2`, ...: the same
    run with ATEN_CPU_CAPABILITY=avx2 ends with other last digits). MKL, which runs the matmuls, also
    picks its code for the CPU it finds (MKL_CBWR=COMPATIBLE, another choice, changes the bits too), so
    the same capability on another CPU model is no promise of the same bits."""
    return {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Stop glibc from returning large freed blocks to the OS after every step.

    By default each activation buffer above the mmap threshold is mmap'd, freed with munmap,
    and faulted back in page by page on the next step (bench/bench_train.py counts the faults
    per step). Serving them from the heap and never trimming it keeps the pages mapped. This is
    process-wide: every model in the process benefits. Returns False where glibc is absent.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = (mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1) and ok
    return ok


def peak_memory_mib(device: torch.device | str | None = None) -> dict[str, float]:
    """This process's peak resident memory so far (`peak_rss_mib`, from getrusage) and, on a CUDA device,
    the peak of tensor memory allocated on it (`cuda_peak_mib`): a measurement, so it goes with timings."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device is not None and torch.device(device).type == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
