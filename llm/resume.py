"""The resume state: what a training run saves to go on exactly where it stopped, and whose it is.

One file per stage, `models/resume/<stage>.pt` (never a DVC output): a `TrainState` written with
`torch.save` as a dict of tensors, numbers, strings and lists, and read with `weights_only=True` (an
untrusted file is never unpickled). It holds the weights and optimizer, the position (step, epoch,
micro-batches done), the epoch's permutation seed, the History so far and the RNG states: torch's
global one and, with several processes, every rank's dropout stream. A state belongs to one run, the
fingerprint of its params, its starting weights and its data (`run_fingerprint`): any other run
ignores it. `StateStore` owns the file and `<file>.lock`, held while a run trains and writes its outputs.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llm import distributed
from llm.checkpoint import weights_state_dict
from llm.data import TokenWindowDataset
from llm.files import atomic_path, exclusive_lock

SAVE_ERRORS = (OSError, RuntimeError)  # torch.save reports a failed write (a full disk) as RuntimeError


@dataclass
class History:
    """Evaluation points (the book's three lists plus step, epoch and lr) and run totals."""

    step: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    tokens_seen: list[int] = field(default_factory=list)
    examples_seen: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    epoch_metrics: list[dict[str, Any]] = field(default_factory=list)  # what on_epoch_end returned
    steps: int = 0
    total_tokens: int = 0
    total_examples: int = 0
    train_seconds: float = 0.0  # wall time of the loop, evaluations included
    eval_seconds: float = 0.0  # of which in evaluations (bench/bench_recipes.py counts training without them)

    def record(self, step: int, epoch: int, train_loss: float, val_loss: float, lr: float, extra: dict) -> None:
        """An evaluation point: the losses and extra metrics at `step`, with the totals so far."""
        self.step.append(step)
        self.epoch.append(epoch)
        self.tokens_seen.append(self.total_tokens)
        self.examples_seen.append(self.total_examples)
        self.train_loss.append(train_loss)
        self.val_loss.append(val_loss)
        self.lr.append(lr)
        for name, value in extra.items():
            self.extra.setdefault(name, []).append(value)

    def rows(self) -> list[dict[str, Any]]:
        keys = ["step", "epoch", "tokens_seen", "examples_seen", "train_loss", "val_loss", "lr"]
        columns = [getattr(self, k) for k in keys]
        rows = [dict(zip(keys, vals, strict=True)) for vals in zip(*columns, strict=True)]
        for name, values in self.extra.items():
            for row, v in zip(rows, values, strict=True):
                row[name] = v
        return rows


@dataclass
class TrainState:
    """A run's resume state (the file's keys, in this order)."""

    run_id: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int  # optimizer steps done
    epoch: int  # epochs completed
    batches_done: int  # micro-batches done in the current epoch
    epoch_seed: int | None  # the seed of the current epoch's permutation
    history: History
    rng_cpu: torch.Tensor  # torch's global RNG
    rng_cuda: list[torch.Tensor]
    world_size: int = 1
    rng_ranks: list | None = None  # several processes: every rank's dropout stream, (cpu, cuda)

    def to_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**state, "history": self.history.__dict__}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in state.items() if k in names}, "history": History(**state["history"])})

    def own_dropout(self, world_size: int, rank: int) -> tuple | None:
        """This rank's dropout stream, if the state was saved by as many processes (else it is derived anew)."""
        if world_size > 1 and self.world_size == world_size and self.rng_ranks:
            return tuple(self.rng_ranks[rank])
        return None

    def restore_rng(self, dropout: distributed.DropoutStreams, world_size: int, rank: int) -> None:
        """torch's global RNG as the interrupted run had it, and this rank's dropout stream when saved by
        as many processes (otherwise the loop derives it anew)."""
        torch.set_rng_state(self.rng_cpu)
        if self.rng_cuda:
            torch.cuda.set_rng_state_all(self.rng_cuda)
        own = self.own_dropout(world_size, rank)
        if own is not None:
            dropout.restore(own)


# --- whose state it is ---------------------------------------------------------------------------
PER_PROCESS = ("batch_size", "nproc_per_node")  # how a run's examples are split over processes


def run_params(section) -> dict[str, Any]:
    """A training section's params that identify a run, for `Trainer(run_id=...)`: all but how its
    examples are split over processes (the Trainer adds the examples per micro-batch over all
    processes), so that a state saved by 2 processes at batch 4 resumes on 1 at batch 8."""
    return {k: v for k, v in vars(section).items() if k not in PER_PROCESS}


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fingerprint(run_id: Any, model: torch.nn.Module, train_set: Dataset, val_set: Dataset, micro_batch: int) -> str:
    """The run's identity: `run_id` (its params), its starting weights and data, and the examples per
    micro-batch over all processes, not how they are split (2 x 4 resumes on 1 x 8)."""
    start = {"weights": weights_fingerprint(model), "train": data_fingerprint(train_set)}
    start["val"] = data_fingerprint(val_set)
    start["micro_batch"] = micro_batch
    return fingerprint({"run": run_id, "start": start})


def _feed(h, obj: Any) -> None:
    """Hash `obj` by content: tensors and arrays by dtype, shape and bytes; token lists, numbers,
    strings and nested lists, tuples and dicts by value; anything else by its repr."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    elif isinstance(obj, (list, tuple)):
        if obj and all(type(x) is int for x in obj):  # a token list: one buffer, not one repr per id
            h.update(f"I{len(obj)}".encode())
            h.update(np.asarray(obj, dtype=np.int64))
        else:
            h.update(f"L{len(obj)}".encode())
            for x in obj:
                _feed(h, x)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=str):
            _feed(h, str(key))
            _feed(h, obj[key])
    else:
        text = repr(obj).encode()
        h.update(f"{type(obj).__name__}{len(text)}:".encode() + text)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    _feed(h, dict(weights_state_dict(model)))
    return h.hexdigest()[:16]


def data_fingerprint(dataset: Dataset) -> str:
    """A hash of what a dataset yields: the token array and windowing of a `TokenWindowDataset`,
    every item of any other. Reading the items leaves torch's global RNG as it was."""
    h = hashlib.sha256(type(dataset).__qualname__.encode())
    if isinstance(dataset, TokenWindowDataset):
        _feed(h, [len(dataset), dataset.max_length, dataset.stride])
        _feed(h, np.asarray(dataset.ids))
    else:
        with torch.random.fork_rng(devices=[]):
            _feed(h, len(dataset))
            for i in range(len(dataset)):
                _feed(h, dataset[i])
    return h.hexdigest()[:16]


# --- the file ------------------------------------------------------------------------------------
class StateStore:
    """One run's resume state at `path`, and `<path>.lock`. With several processes rank 0 reads (only
    its disk need hold the file) and writes; `load` and `save` are called by every rank."""

    def __init__(self, path: str | Path, run_id: str, log, rank: int = 0, world_size: int = 1):
        self.path, self.run_id, self.log = Path(path), run_id, log
        self.is_main, self.world_size = rank == 0, world_size
        self.saved_step: int | None = None  # the step of this run's state on disk, if any
        self._lock: ExitStack | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def lock(self) -> bool:
        """Take `<path>.lock` unless this store holds it (rank 0); whether this call took it. Raises
        LockHeld when another run of the stage holds it."""
        if self._lock is not None or not self.is_main:
            return False
        stack = ExitStack()
        stack.enter_context(exclusive_lock(self.lock_path))
        self._lock = stack
        return True

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock, stack = None, self._lock
            stack.close()

    def _read(self) -> TrainState | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            self.log(f"ignoring unreadable training state {self.path}: {type(exc).__name__}")
            return None
        if state.get("run_id") != self.run_id:
            self.log(f"ignoring training state {self.path}: it belongs to other params, starting weights or data")
            return None
        return TrainState.from_dict(state)

    def load(self) -> TrainState | None:
        """The saved state if it belongs to this run, else None (saying why); on every rank."""
        state = self._read() if self.is_main else None
        if self.world_size > 1:
            state = distributed.broadcast_object(state)
        if state is not None:
            self.saved_step = state.step
        return state

    def save(self, state: TrainState | None, step: int) -> None:
        """Write `state` of `step` (rank 0's; None on the others) atomically; raises on every rank if it
        could not."""
        error = None
        if self.is_main:
            try:
                with atomic_path(self.path) as tmp:
                    torch.save(state.to_dict(), tmp)
            except SAVE_ERRORS as exc:
                error = exc
        if self.world_size > 1 and not distributed.broadcast_int(int(error is None)):
            error = error or OSError(f"rank 0 could not write {self.path}")
        if error is not None:
            raise error
        self.saved_step = step

    def clear(self) -> None:
        """Remove the state: once every output of the run is written."""
        if self.is_main:
            self.path.unlink(missing_ok=True)
            self.saved_step = None
