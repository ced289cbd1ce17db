"""Process-level settings: `runtime.threads` sets torch's CPU threads in the stages' processes, and with
them the bits of what the stages write: the same params give the same bytes in another process beside a
busy one, another thread count (or CPU instruction set) other ones."""

import functools
import json
import re
import subprocess
import sys

import pytest
import torch

from llm.runtime import set_threads
from tests.conftest import ROOT, committed_yaml
from tests.test_distributed import STAGE_ENV, run_stage, stage_project


def test_set_threads_sets_torchs_threads_and_zero_leaves_them():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(0) == 1  # 0: as it is
    finally:
        torch.set_num_threads(before)


def test_the_pretrain_stage_runs_on_runtime_threads(tmp_path):
    """`runtime.threads: 1` in params.yaml: the stage's process runs torch on one thread (its timings say so)."""
    project = stage_project(tmp_path)
    params = json.loads((project / "params.yaml").read_text())
    params["runtime"]["threads"] = 1
    (project / "params.yaml").write_text(json.dumps(params))
    out = run_stage(project, env={**STAGE_ENV, "OMP_NUM_THREADS": "2"})  # the param wins over torch's default
    assert out.returncode == 0, out.stderr[-2000:]
    timings = json.loads((project / "timings" / "pretrain.json").read_text())
    assert timings["threads"] == 1 and timings["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


# --- the same params, the same bits -----------------------------------------------------------------------
OUTPUTS = ("models/pretrain/model.safetensors", "metrics/curves/pretrain.csv", "metrics/pretrain.json")


def written(project) -> dict[str, bytes]:
    """What the pretrain stage wrote that depends only on code, data and params (not its timings)."""
    return {name: (project / name).read_bytes() for name in OUTPUTS}


def pretrain(project, omp_threads: str, busy: bool = False) -> dict[str, bytes]:
    """Run the stage in a process of its own whose OMP_NUM_THREADS (torch's default) is `omp_threads`,
    beside a process that keeps a core busy when `busy`; what it wrote."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = run_stage(project, env={**STAGE_ENV, "OMP_NUM_THREADS": omp_threads})
    finally:
        if hog:
            hog.kill()
            hog.wait()
    assert out.returncode == 0, out.stderr[-2000:]
    return written(project)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The tiny pretrain run with the committed `runtime.threads`, torch's default saying 1 thread."""
    return pretrain(stage_project(tmp_path_factory.mktemp("default"), threads=None), "1")


def test_the_committed_params_give_the_same_bytes_in_another_process_beside_a_busy_one(default_run, tmp_path):
    """Issue 28: with `runtime.threads: 0` torch's default (one thread per core) set the bits, so a clone
    on another machine wrote other weights. With the committed count, a second process whose
    OMP_NUM_THREADS says 3, beside a process busy on one of the cores, writes the same bytes as the
    first (whose OMP_NUM_THREADS said 1): weights, curve and metrics."""
    threads = committed_yaml("params.yaml")["runtime"]["threads"]
    assert threads == 2  # a fixed count: 0 would leave it to each machine
    project = stage_project(tmp_path, threads=None)
    assert pretrain(project, "3", busy=True) == default_run
    assert json.loads((project / "timings" / "pretrain.json").read_text())["threads"] == threads


def test_another_thread_count_changes_the_bytes(default_run, tmp_path):
    """What does change the bits: `runtime.threads` 1 instead of 2, in the same environment, gives other
    weights, the same numbers up to float rounding."""
    other = pretrain(stage_project(tmp_path, threads=1), "1")
    name = OUTPUTS[0]
    assert other[name] != default_run[name]
    a, b = (json.loads(run["metrics/pretrain.json"]) for run in (other, default_run))
    assert a["val"]["loss"] == pytest.approx(b["val"]["loss"], rel=1e-5) and a["steps"] == b["steps"]


def weights_after(threads: int, steps: int = 1, deterministic: bool = False) -> str:
    """sha256 of a 1-layer model's weights after `steps` AdamW steps on `threads` torch threads."""
    import hashlib

    from llm.model import GPTModel
    from tests.conftest import tiny_cfg

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    try:
        torch.manual_seed(0)
        model = GPTModel(tiny_cfg(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            x = torch.randint(0, 97, (2, 9))
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(False)
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


@functools.cache
def weights_in_a_process(first: str = "", **env: str) -> str:
    """`weights_after(2, steps=2)` in a fresh process with `env` added to its environment, after the
    statement `first` (once per env and statement)."""
    code = f"{first}\nfrom tests.test_runtime import weights_after; print(weights_after(2, steps=2))"
    out = subprocess.run([sys.executable, "-c", code], env={**STAGE_ENV, **env}, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_the_thread_count_changes_one_step_and_deterministic_algorithms_change_nothing():
    """`llm.runtime.set_threads`' account: the starting weights do not depend on the threads, one step
    of a 1-layer model already does (1, 2 and 3 threads: three results), and torch's deterministic
    algorithms give the same bits (no CPU kernel here is nondeterministic)."""
    assert len({weights_after(n, steps=0) for n in (1, 2, 3)}) == 1
    by_threads = [weights_after(n) for n in (1, 2, 3)]
    assert len(set(by_threads)) == 3
    assert weights_after(2, deterministic=True) == by_threads[1] == weights_after(2)


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"MKL_CBWR": "COMPATIBLE"}])
def test_other_cpu_code_changes_the_bits_at_the_same_thread_count(env):
    """`llm.runtime.machine`'s account of "the same kind of machine": torch's kernels for AVX2 instead of
    AVX-512, or MKL's matmuls pinned to their compatible code, give other weights at 2 threads."""
    if "ATEN_CPU_CAPABILITY" in env and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU runs AVX2 code already")
    if "MKL_CBWR" in env and not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    assert weights_in_a_process(**env) != weights_in_a_process() == weights_after(2, steps=2)


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "CPU", "cuda:0 "])
def test_a_device_name_params_yaml_refuses_is_refused_by_select_device_too(name):
    """One rule for device names (llm.choices.DEVICE_PATTERN): params.yaml, --device and the library."""
    from llm.errors import LLMError
    from llm.pipeline.params import parse_params
    from llm.runtime import select_device

    with pytest.raises(LLMError, match=re.escape(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")):
        select_device(name)
    with pytest.raises(LLMError, match="train.device"):
        parse_params({"train": {"device": name}})


def test_keeping_freed_memory_changes_no_bits():
    """glibc's allocator setting of the stages (`llm.runtime.keep_freed_memory`, process-wide) serves
    the same tensors from other addresses: the same weights."""
    keep = "from llm.runtime import keep_freed_memory; assert keep_freed_memory()"
    assert weights_in_a_process(keep) == weights_in_a_process() == weights_after(2, steps=2)
