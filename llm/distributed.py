"""Multi-process (DDP) training on one node: the launch, the process group, the few collectives.

A training stage calls `start(section, module, params_path)` once its params are read. With
`nproc_per_node: 1` it does nothing. Above 1, a process not started by torchrun (no `LOCAL_RANK`
and `WORLD_SIZE` in its environment) runs torchrun, `python -m llm.distributed --torchrun --standalone
--nproc_per_node N -m llm.distributed MODULE PARAMS` (`launch`: torchrun with one-line failures), in a
session of its own (`run_torchrun`), and exits with its status; each process that
torchrun starts joins the process group (gloo on CPU, nccl on CUDA with the GPU `LOCAL_RANK`) and
runs the stage's `main`. `llm.trainer.Trainer` reads the rank and world size from the group (through
`llm.loaders.make_loaders`), wraps the model in DistributedDataParallel (`wrap_ddp`), gives each rank a
dropout stream of its own (`DropoutStreams`) and averages its evaluation losses over the ranks; the group
is destroyed when the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import importlib
import inspect
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llm.errors import ConfigError, LLMError
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
    if launched_by_torchrun():
        init_process_group(section.device)
        return
    if nproc <= 1:
        return
    if module == "__main__":
        module = _main_module()
    cmd = [
        sys.executable, "-m", "llm.distributed", "--torchrun", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "llm.distributed", module, str(params_path),
    ]  # fmt: skip
    sys.stdout.flush()
    raise SystemExit(run_torchrun(cmd))


def _main_module() -> str:
    """The module name `python -m` ran as `__main__`, which torchrun's processes run again. A stage
    run as a file (`python stages/pretrain.py`) has none: its path under the working directory names it."""
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is not None:
        return main.__spec__.name
    path = Path(main.__file__).resolve()
    try:
        return ".".join(path.relative_to(Path.cwd().resolve()).with_suffix("").parts)
    except ValueError:
        raise LLMError(f"{path} is not under the working directory: run the stage as `python -m stages.NAME`") from None


SHUTDOWN_TIMEOUT = 120  # seconds torchrun waits for its workers to save and exit before SIGKILL (torchrun's own: 30)


def run_torchrun(cmd: list[str]) -> int:
    """Run torchrun in its own session and wait; returns its status (130 after a forwarded stop).

    torchrun starts each worker in a session of its own, and runs in one here, so the terminal's
    Ctrl-C reaches this process only and torchrun gets one signal, not the terminal's and then this
    process's (a second signal would cut its shutdown short). The first
    SIGINT or SIGTERM here is forwarded to torchrun as one SIGTERM, which it passes to every worker:
    each finishes its step, they agree on the step to stop at, rank 0 saves the resume state, and all
    exit. torchrun allows them `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds (default here
    SHUTDOWN_TIMEOUT) before SIGKILL; later signals only say so. If this process dies, torchrun gets
    SIGTERM (Linux's parent-death signal) and shuts its workers down the same way.
    """
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    stopping: list[int] = []

    def forward(signum, frame):
        if stopping:
            print(f"already stopping: waiting for the workers to save (torchrun kills them after "
                  f"{env['TORCH_ELASTIC_SHUTDOWN_TIMEOUT']} s)", file=sys.stderr, flush=True)  # fmt: skip
            return
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping and status != 0:  # torchrun reports a forwarded signal as its own failure
        return 130
    return status if status >= 0 else 128 - status  # killed by a signal: as a shell reports it


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


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


def gather_objects(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); pickled, so for small things."""
    rank, world = rank_world()
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (pickled: the resume state, read on rank 0's disk only)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(*values: float) -> list[float]:
    """The sums over ranks of a few numbers (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """`model` in DistributedDataParallel: gradients averaged over the ranks in the backward pass; rank 0's
    weights broadcast once; the buffers (the causal masks, constant) never synchronised."""
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else "broadcast_buffers": False}  # fmt: skip
    return ddp(model, device_ids=ids, **no_sync)


def rank_seed(epoch_seed: int, rank: int, *more: int) -> int:
    """The seed of a rank's dropout stream in an epoch (several processes): a hash of the epoch's
    permutation seed (rank 0's draw, shared by all), the rank and `more` (the step, when a run resumes
    mid-epoch on another number of processes). Distinct ranks get unrelated streams, so their
    dropout masks differ; one process never reseeds (the book's stream)."""
    words = np.random.SeedSequence([epoch_seed, rank, *more]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


class DropoutStreams:
    """Several processes: torch's global RNG serves the data order, evaluations and hooks exactly as with
    one process (so with dropout 0, N processes at batch B train like one at N x B), and the training
    steps' dropout draws from a stream of each rank's own, swapped in around each forward and backward
    pass (`active`) and seeded at each epoch's first batch with `rank_seed(epoch seed, rank)`, so the
    ranks' masks differ. On CUDA dropout draws from the GPU's generator, which nothing else uses: it is
    seeded per rank and left in place. With one process every method does nothing."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.device = rank, device
        self.rng = torch.Generator() if world_size > 1 else None

    @contextmanager
    def active(self):
        """torch's global CPU RNG is this rank's dropout stream in the block."""
        if self.rng is None:
            yield
            return
        data = torch.get_rng_state()
        torch.set_rng_state(self.rng.get_state())
        try:
            yield
        finally:
            self.rng.set_state(torch.get_rng_state())
            torch.set_rng_state(data)

    def seed(self, epoch_seed: int, *more: int) -> None:
        if self.rng is None:
            return
        seed = rank_seed(epoch_seed, self.rank, *more)
        self.rng.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def seeded_at_first_batch(self, batches: Iterator, epoch_seed: Callable[[], int]) -> Iterator:
        """`batches`, the stream seeded once the first is drawn (drawing it draws the epoch's seed,
        which `epoch_seed()` then returns); `batches` itself with one process."""
        return batches if self.rng is None else self._seeded(batches, epoch_seed)

    def _seeded(self, batches: Iterator, epoch_seed: Callable[[], int]) -> Iterator:
        for i, batch in enumerate(batches):
            if i == 0:
                self.seed(epoch_seed())
            yield batch

    def state(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        return self.rng.get_state(), cuda

    def gather(self) -> list | None:
        """Every rank's stream state on rank 0, for the resume state (None with one process)."""
        return gather_objects(self.state()) if self.rng is not None else None

    def restore(self, state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
        cpu, cuda = state
        self.rng.set_state(cpu)
        if cuda and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda[0], self.device)


def launch(argv: list[str]) -> int:
    """torchrun (`torch.distributed.run`) with `argv`, its failures reported in one line each: a worker
    that failed has printed its own error; torchrun's report of it would repeat it as a traceback."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as exc:  # the workers were told to stop, and have saved
        print(f"torchrun: stopped by signal {exc.sigval.name}", file=sys.stderr)
        return 130
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"torchrun: rank {rank} failed with exit code {failure.exitcode}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0


def main(argv: list[str]) -> None:
    """`python -m llm.distributed --torchrun ARGS` runs torchrun (`launch`); a process torchrun started,
    `python -m llm.distributed MODULE PARAMS`, runs MODULE's `main(PARAMS)`."""
    from llm.errors import run_main

    if argv[:1] == ["--torchrun"]:
        raise SystemExit(launch(argv[1:]))
    module, params_path = argv
    stage = importlib.import_module(module)
    name, rank = module.rsplit(".", 1)[-1], int(os.environ.get("RANK", "0"))
    run_main(name if rank == 0 else f"{name} [rank {rank}]", stage.main, params_path, argv=[])


if __name__ == "__main__":
    main(sys.argv[1:])
