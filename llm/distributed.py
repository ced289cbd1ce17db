"""Multi-process (DDP) training on one node: the launch, the process group, the few collectives.

A training stage calls `start(section, module, params_path)` once its params are read. With
`nproc_per_node: 1` it does nothing. Above 1, a process not started by torchrun (no `LOCAL_RANK`
and `WORLD_SIZE` in its environment) runs `python -m torch.distributed.run --standalone
--nproc_per_node N -m llm.distributed MODULE PARAMS` and exits with its status; each process that
torchrun starts joins the process group (gloo on CPU, nccl on CUDA with the GPU `LOCAL_RANK`) and
runs the stage's `main`. `llm.trainer.Trainer` reads the rank and world size from the group, wraps
the model in DistributedDataParallel and averages its evaluation losses over the ranks; the group
is destroyed when the process exits.
"""

from __future__ import annotations

import atexit
import importlib
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from llm.errors import ConfigError
from llm.runtime import select_device


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def start(section, module: str, params_path: str | os.PathLike = "params.yaml") -> None:
    """Relaunch through torchrun (`section.nproc_per_node` > 1), or join the process group in a
    process torchrun started; nothing with one process. `module` is the stage's (`__name__` of the
    module defining its `main`; `__main__` stands for the module run with `python -m`)."""
    nproc = getattr(section, "nproc_per_node", 1)
    if module == "__main__":
        module = sys.modules["__main__"].__spec__.name
    if launched_by_torchrun():
        init_process_group(section.device)
        return
    if nproc <= 1:
        return
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "llm.distributed", module, str(params_path),
    ]  # fmt: skip
    sys.stdout.flush()
    raise SystemExit(subprocess.call(cmd))


def init_process_group(device_name: str) -> None:
    """Join the group torchrun set up (its env:// variables): gloo on CPU, nccl with one GPU per rank."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    device = select_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"nproc_per_node > 1 needs a cpu or cuda device, not {device.type}")
    dist.init_process_group(backend)
    atexit.register(destroy)


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (e.g. for files rank 0 writes and the others read); nothing with one process."""
    if rank_world()[1] > 1:
        dist.barrier()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_int(value: int, src: int = 0) -> int:
    """`value` of rank `src` on every rank (e.g. the seed of an epoch's permutation); `value` itself
    without a process group."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.broadcast(t, src)
    return int(t.item())


def sum_over_ranks(*values: float) -> list[float]:
    """The sums over ranks of a few numbers (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def main(argv: list[str]) -> None:
    """A process torchrun started: `python -m llm.distributed MODULE PARAMS` runs MODULE's `main(PARAMS)`."""
    from llm.errors import run_main

    module, params_path = argv
    stage = importlib.import_module(module)
    run_main(module.rsplit(".", 1)[-1], stage.main, params_path, argv=[])


if __name__ == "__main__":
    main(sys.argv[1:])
