"""The one training loop: pretraining and both finetuning stages run it with their own data and loss.

With the defaults (constant lr, no warmup, no clipping, no accumulation) it is the book's
`train_model_simple`: same update order, same evaluation points (`step % eval_freq == 0` on
`eval_iter` batches of a fresh shuffle of the training set and of the validation set), and the
same use of torch's global RNG, so a run seeded like the book's draws the same data order and
dropout masks. On top: warmup + cosine decay, gradient clipping and accumulation, bf16 autocast,
`torch.compile` of the training steps (`compile`), a progress bar, and resumable checkpoints (model,
optimizer, step, data order, RNG) written
periodically, on Ctrl-C/SIGTERM and at the end, after which a resumed run ends with the same weights
and History as an uninterrupted one, whichever step it stopped at.

Multi-process (DDP, `llm.distributed`): when a process group is initialised the Trainer wraps the
model in `DistributedDataParallel` for the training steps (gradients averaged over the ranks; no
all-reduce on the micro-batches before the last of an accumulated step, `no_sync`); `batch_size` is
per process, so a step sees `batch_size * world_size * grad_accum_steps` examples. Every rank takes
a disjoint, equally long shard of each epoch's permutation, whose seed rank 0 draws and broadcasts.
Evaluation runs the unwrapped model on each rank's shard and averages the losses over all ranks
(weighted by their batches), so every rank records the same History; only rank 0 runs `on_record`
and `on_epoch_end`, logs, and writes the resume state. Randomness: torch's global RNG draws the data
order, evaluations and hooks exactly as with one process (so with dropout 0, N processes at batch B
train like one at N x B); dropout in the training steps draws from a stream of each rank's own,
seeded at every epoch's first batch with `rank_seed(epoch seed, rank)`, so the ranks' masks differ.
A stop request or a non-finite loss on any rank stops every rank at the same step.

Resuming under DDP: rank 0 reads the state and sends it to the others. A run is identified by its
params without how its examples are split over processes (`run_params`) plus the examples per
micro-batch over all processes (`batch_size * world_size`), so a state saved by N processes resumes
on M with M x batch_size' = N x batch_size: the remaining steps see the same examples in the same
global batches. On as many processes every rank takes back its own dropout stream and the run ends
exactly as an uninterrupted one; on another number the dropout streams are derived anew (with
dropout 0 the result equals the uninterrupted run up to the order of floating-point sums).

The resume state of a finished run stays until the stage has written its outputs: a stage runs
`with trainer: history = trainer.fit(); <write outputs>`, which removes the state only when the block
succeeds, and holds `<state_path>.lock` meanwhile so that a second run of the stage stops at once. A
state belongs to one run: its params (`run_id`), its starting weights and its data (both hashed
before training); any other run ignores it. A NaN or infinite loss stops training before the update
(`NonFiniteLoss`), keeping the last good state; a periodic checkpoint that cannot be written is a
warning, not the end of the run.

The book's own functions (`llm.book.ch05.train_model_simple`, `llm.book.ch06.train_classifier_simple`)
run this loop too: they pass the DataLoaders and the optimizer they are given (`train_loader=`,
`val_loader=`, `optimizer=`) and a `LoopSettings`. The training loss is then measured on the
training loader itself, as the book does, and resumable checkpoints are not available.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from llm import distributed
from llm.checkpoint import weights_state_dict
from llm.data import TokenWindowDataset
from llm.errors import LLMError, first_line
from llm.files import atomic_path, exclusive_lock
from llm.losses import calc_loss_batch, calc_loss_loader
from llm.progress import progress_bar, write
from llm.runtime import select_device
from llm.schedule import lr_at

LossFn = Callable[[torch.nn.Module, Any, torch.device, str], torch.Tensor]


class TrainingInterrupted(LLMError):
    """Training stopped on a signal after saving a resumable checkpoint."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class NonFiniteLoss(LLMError):
    """The training loss became NaN or infinite: training stopped before that step's update."""


def lm_loss(model, batch, device, precision):
    """Next-token cross-entropy over every position (the book's `calc_loss_batch`)."""
    return calc_loss_batch(batch[0], batch[1], model, device, precision)


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as in the book, fused into one kernel where the device supports it.

    The per-parameter (foreach) AdamW step makes many passes over memory; the fused kernel does the
    same update in one (bench/bench_train.py measures the step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device.type if params else "cpu"
    fused = device in ("cpu", "cuda", "mps")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


class EpochSampler(Sampler[int]):
    """Shuffles exactly like `RandomSampler(generator=None)`: each pass draws its seed from torch's
    global RNG, so seeding once reproduces the book's data order. The seed of the current pass and
    a start offset can be restored, which is what resuming mid-epoch needs. Each rank takes every
    `world_size`-th index of the shared permutation, whose seed rank 0 draws and broadcasts; with
    `even`, the last `n % world_size` indices of the permutation are left out so that every rank has
    as many (the training shards: every rank must take the same number of steps)."""

    def __init__(self, n: int, shuffle: bool, rank: int = 0, world_size: int = 1, even: bool = False):
        self.n, self.shuffle, self.rank, self.world_size = n, shuffle, rank, world_size
        self.used = n - n % world_size if even else n
        self.seed: int | None = None  # seed of the pass in progress
        self._resume: tuple[int | None, int] | None = None

    def resume(self, seed: int | None, start: int) -> None:
        self._resume = (seed, start)

    def __iter__(self):
        start = 0
        if self._resume is not None:
            (self.seed, start), self._resume = self._resume, None
        elif self.shuffle:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
            if self.world_size > 1:  # every rank draws (the same RNG use), rank 0's seed counts
                self.seed = distributed.broadcast_int(self.seed)
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        else:
            order = list(range(self.n))
        yield from order[: self.used][self.rank :: self.world_size][start:]

    def __len__(self) -> int:
        return len(range(self.rank, self.used, self.world_size))


@dataclass
class LoopSettings:
    """The attributes `Trainer` reads, with the book's defaults: a constant lr with no warmup, no
    clipping, no accumulation, fp32, no periodic checkpoints. The book's functions build one; the
    pipeline's stages pass their own params section, which has the same attributes."""

    num_epochs: int
    eval_freq: int
    eval_iter: int
    lr: float = 4e-4
    weight_decay: float = 0.1
    batch_size: int = 1  # only read when the Trainer builds its own loaders
    seed: int | None = None  # not read by the loop: the caller seeds torch
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    grad_clip: float = 0.0
    grad_accum_steps: int = 1
    precision: str = "fp32"
    device: str = "cpu"
    checkpoint_every: int = 0
    compile: bool = False  # torch.compile for the training steps (settings without this attribute: off)


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
    train_seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        keys = ["step", "epoch", "tokens_seen", "examples_seen", "train_loss", "val_loss", "lr"]
        columns = [getattr(self, k) for k in keys]
        rows = [dict(zip(keys, vals, strict=True)) for vals in zip(*columns, strict=True)]
        for name, values in self.extra.items():
            for row, v in zip(rows, values, strict=True):
                row[name] = v
        return rows


PER_PROCESS = ("batch_size", "nproc_per_node")  # how a run's examples are split over processes


def run_params(section) -> dict[str, Any]:
    """A training section's params that identify a run, for `Trainer(run_id=...)`: all but how its
    examples are split over processes (the Trainer adds the examples per micro-batch over all
    processes), so that a state saved by 2 processes at batch 4 resumes on 1 at batch 8."""
    return {k: v for k, v in vars(section).items() if k not in PER_PROCESS}


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def rank_seed(epoch_seed: int, rank: int, *more: int) -> int:
    """The seed of a rank's dropout stream in an epoch (several processes): a hash of the epoch's
    permutation seed (rank 0's draw, shared by all), the rank and `more` (the step, when a run resumes
    mid-epoch on another number of processes). Distinct ranks get unrelated streams, so their
    dropout masks differ; one process never reseeds (the book's stream)."""
    words = np.random.SeedSequence([epoch_seed, rank, *more]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _reason(exc: BaseException) -> str:
    """`exc` on one line (torch's write errors span several)."""
    return f"{type(exc).__name__}: {first_line(exc)}"


_SAVE_ERRORS = (OSError, RuntimeError)  # torch.save reports a failed write (a full disk) as RuntimeError


class Trainer:
    """`Trainer(model, train_set, val_set, settings).fit()` → History.

    `settings` is a training params section (or a `LoopSettings`, or anything with its attributes).
    `loss_fn(model, batch, device, precision)` returns the mean loss of a batch; `evaluate_fn(model)`,
    if given, returns extra metrics logged at every evaluation (e.g. accuracies); `on_epoch_end(model,
    epoch)` runs after each epoch (the model is put back in training mode after it); `on_record(history)`
    runs on rank 0 after each evaluation (the stages rewrite their curve file there, so a curve is on
    disk while training runs and after an interruption); a dict that `on_epoch_end` returns is kept
    in `history.epoch_metrics` (saved with the resume state). `state_path` enables resumable
    checkpoints; `run_id` (e.g. the params) identifies the run, and the Trainer adds hashes of the
    starting weights and of the training and validation data: a saved state of any other run is
    ignored. `fit()` saves the final state and keeps it; `clear_state()` removes it, and
    `with trainer: ...` does so when the block succeeds (see the module's docstring).

    Prebuilt loaders and optimizer (what the book's functions receive) instead of datasets:
    `Trainer(model, settings=s, train_loader=..., val_loader=..., optimizer=...)`. The loop then
    iterates those loaders as they are (their batch size, shuffling, collate and `drop_last`), and
    evaluates the training loss on the training loader itself, as the book does: for a shuffled
    loader each evaluation draws a fresh order from torch's global RNG exactly where the book's loop
    draws it. Resuming is not supported with a given loader (its data order cannot be restored), so
    `state_path` must be None; `settings.batch_size` is not read. A given `optimizer` is used as is:
    with a constant lr and no warmup the loop never touches its learning rate.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_set: Dataset | None = None,
        val_set: Dataset | None = None,
        settings=None,
        loss_fn: LossFn = lm_loss,
        collate_fn=None,
        evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        on_epoch_end: Callable[[torch.nn.Module, int], None] | None = None,
        on_record: Callable[[History], None] | None = None,
        state_path: str | os.PathLike | None = None,
        run_id: Any = None,
        progress: bool = True,
        log: Callable[[str], None] = write,
        *,
        train_loader: DataLoader | None = None,
        val_loader: DataLoader | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        if settings is None:
            raise LLMError("Trainer needs settings (a params section or a LoopSettings)")
        given_loaders = train_loader is not None
        kinds = {train_set is None, val_set is None, train_loader is not None, val_loader is not None}
        if kinds != {given_loaders}:
            raise LLMError("Trainer takes either train_set and val_set, or train_loader and val_loader")
        if given_loaders and collate_fn is not None:
            raise LLMError("collate_fn belongs to the given DataLoaders: build them with it")
        if given_loaders and state_path is not None:
            raise LLMError(
                "resumable checkpoints (state_path) need the Trainer to build its own loaders: "
                "the data order of a given DataLoader cannot be saved and restored"
            )
        self.s = settings
        # The book's functions, with their given loaders, train in one process.
        self.rank, self.world_size = (0, 1) if given_loaders else distributed.rank_world()
        self.is_main = self.rank == 0
        self.state_path = Path(state_path) if state_path else None
        if self.state_path:  # before training and before moving to the device: the weights a run starts from
            start = {"weights": weights_fingerprint(model), "train": data_fingerprint(train_set)}
            start["val"] = data_fingerprint(val_set)
            # Examples per micro-batch over all processes, not how they are split: 2 x 4 resumes on 1 x 8.
            start["micro_batch"] = settings.batch_size * self.world_size
            self.run_id = fingerprint({"run": run_id, "start": start})
        else:
            self.run_id = fingerprint(run_id) if run_id is not None else None
        self.device = select_device(settings.device)
        if self.device.type == "cuda" and self.device.index is None and self.world_size > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())  # DDP: the rank's GPU
        self.model = model.to(self.device)
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.loss_fn, self.evaluate_fn, self.on_epoch_end = loss_fn, evaluate_fn, on_epoch_end
        self.on_record = on_record
        if given_loaders:
            self.sampler = None
            self.train_loader = train_loader
            # The book evaluates on the training loader itself (a fresh pass: a new shuffle).
            self.train_eval_loader = train_loader
            self.val_loader = val_loader
        else:
            self.sampler = EpochSampler(len(train_set), True, self.rank, self.world_size, even=True)

            def loader(ds, sampler):
                return DataLoader(
                    ds,
                    settings.batch_size,
                    sampler=sampler,
                    drop_last=sampler is self.sampler,
                    collate_fn=collate_fn,
                    pin_memory=self.device.type == "cuda",  # page-locked batches: copied to the GPU without waiting
                )

            self.train_loader = loader(train_set, self.sampler)
            # The book evaluates on a fresh shuffled pass of the training loader and on the val loader.
            self.train_eval_loader = loader(train_set, EpochSampler(len(train_set), True, self.rank, self.world_size))
            self.val_loader = loader(val_set, EpochSampler(len(val_set), False, self.rank, self.world_size))
            if len(self.train_loader) == 0:
                raise LLMError(
                    f"the training set has {len(train_set)} examples: too few for one batch of {settings.batch_size}"
                )
        if len(self.train_loader) == 0:
            raise LLMError("the training loader yields no batches")
        # Several processes: torch's global RNG serves the data order (and the evaluations and hooks),
        # exactly as with one process; the training steps' dropout draws from a stream of each rank's
        # own, swapped in around each forward and backward pass and seeded per epoch (`rank_seed`).
        self.dropout_rng = torch.Generator() if self.world_size > 1 else None
        if self.world_size > 1:  # broadcasts rank 0's weights; the masks are constant buffers
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel
            no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else "broadcast_buffers": False}  # fmt: skip
            self.ddp = ddp(self.model, device_ids=ids, **no_sync)
        # settings.compile (optional, default false): the training steps run `torch.compile` of the module they
        # train (the DDP wrap, if any); evaluation, the hooks and every saved state use `self.model` itself.
        self.step_model = self.ddp or self.model
        if getattr(settings, "compile", False):
            self.step_model = torch.compile(self.step_model)
        if not self.is_main:
            log = _quiet
        if optimizer is None:
            optimizer = make_optimizer(self.model, settings.lr, settings.weight_decay)
        self.optimizer = optimizer
        # A constant rate without warmup is never written into the optimizer: a given optimizer keeps
        # its own lr, and one built here already holds settings.lr.
        self.scheduled = bool(settings.warmup_steps) or settings.lr_schedule != "constant"
        self.steps_per_epoch = math.ceil(len(self.train_loader) / settings.grad_accum_steps)
        # A step budget (`max_steps`, pretraining's token budget) instead of epochs: the epochs go on as
        # needed, the last one may end early, and the lr schedule spans the budget.
        self.max_steps = getattr(settings, "max_steps", None)
        self.total_steps = self.max_steps or self.steps_per_epoch * settings.num_epochs
        self.progress, self.log = progress and self.is_main, log
        self.history = History()
        self.step = 0  # optimizer steps done
        self.epoch = 0  # epochs completed
        self.batches_done = 0  # micro-batches done in the current epoch
        self._stop_requested = False
        self._saved_step: int | None = None  # the step of this run's state on disk, if any
        self._reseed = False  # resumed on another number of processes (see try_resume)
        self._resume_dropout = None
        self._lock: ExitStack | None = None

    # --- evaluation ----------------------------------------------------------------------------
    def process_metrics(self) -> dict[str, int]:
        """With several processes, the examples per optimizer step over all of them (`global_batch`)
        and their number, for a stage's metrics; nothing with one (its metrics files stay as they were)."""
        if self.world_size == 1:
            return {}
        global_batch = self.s.batch_size * self.world_size * self.s.grad_accum_steps
        return {"global_batch": global_batch, "processes": self.world_size}

    def _mean_loss(self, loader: DataLoader, num_batches: int | None) -> float:
        mean = calc_loss_loader(loader, self.model, self.device, num_batches, self.s.precision, self.loss_fn)
        if self.world_size == 1:
            return mean
        n = len(loader) if num_batches is None else min(num_batches, len(loader))  # batches this rank ran
        total, count = distributed.sum_over_ranks(mean * n if n else 0.0, n)
        return total / count if count else float("nan")

    def evaluate(self, num_batches: int | None) -> tuple[float, float, dict[str, float]]:
        """(train loss, val loss, extra metrics) on the first `num_batches` batches, in eval mode."""
        self.model.eval()
        train_loss = self._mean_loss(self.train_eval_loader, num_batches)
        val_loss = self._mean_loss(self.val_loader, num_batches)
        extra = self.evaluate_fn(self.model) if self.evaluate_fn else {}
        self.model.train()
        return train_loss, val_loss, extra

    # --- checkpoints ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint, then raise TrainingInterrupted."""
        self._stop_requested = True

    def _state(self, rng_ranks: list | None) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model": weights_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "epoch_seed": self.sampler.seed,
            "history": self.history.__dict__,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "world_size": self.world_size,
            "rng_ranks": rng_ranks,  # several processes: every rank's dropout streams, (cpu, cuda)
        }

    def save_state(self) -> None:
        """Write the resume state (rank 0, with a state_path); raises if it cannot be written.

        With several processes every rank calls it at the same step: the ranks' RNG states are
        gathered to rank 0, and whether rank 0 could write is broadcast, so every rank knows."""
        if not self.state_path:
            return
        rng_ranks = distributed.gather_objects(self._dropout_states()) if self.world_size > 1 else None
        error = None
        if self.is_main:
            try:
                with atomic_path(self.state_path) as tmp:
                    torch.save(self._state(rng_ranks), tmp)
            except _SAVE_ERRORS as exc:
                error = exc
        if self.world_size > 1 and not distributed.broadcast_int(int(error is None)):
            error = error or OSError(f"rank 0 could not write {self.state_path}")
        if error is not None:
            raise error
        self._saved_step = self.step

    def _save_or_warn(self) -> None:
        """A checkpoint on the way: one that cannot be written (a full disk) is a warning."""
        if self._saved_step == self.step:
            return
        try:
            self.save_state()
        except _SAVE_ERRORS as exc:
            kept = f"; the state of step {self._saved_step} is kept" if self._saved_step is not None else ""
            self.log(
                f"warning: could not save the resume state to {self.state_path} at step {self.step} "
                f"({_reason(exc)}){kept}; training goes on"
            )

    def _interrupt(self) -> None:
        """Save the state and raise TrainingInterrupted (a requested stop)."""
        try:
            self.save_state()
        except _SAVE_ERRORS as exc:
            then = f"resumes from step {self._saved_step}" if self._saved_step is not None else "starts over"
            raise TrainingInterrupted(
                f"training interrupted at step {self.step}, but its resume state could not be saved to "
                f"{self.state_path} ({_reason(exc)}): a rerun {then}"
            ) from exc
        where = f"; resume state saved to {self.state_path}" if self.state_path else ""
        raise TrainingInterrupted(f"training interrupted at step {self.step}{where}")

    def _read_state(self) -> dict[str, Any] | None:
        """The saved state if it belongs to this run, else None (saying why)."""
        if not (self.state_path and self.state_path.is_file()):
            return None
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            self.log(f"ignoring unreadable training state {self.state_path}: {type(exc).__name__}")
            return None
        if state.get("run_id") != self.run_id:
            self.log(f"ignoring training state {self.state_path}: it belongs to other params, starting weights or data")
            return None
        return state

    def try_resume(self) -> bool:
        """Load the saved state if it belongs to this run; returns whether training resumes.

        With several processes rank 0 reads the state (only its disk need hold it) and sends it to
        the others. Written by as many processes, every rank takes back its own RNG state and the run
        goes on exactly as if uninterrupted; written by another number (with as many examples per
        micro-batch: the run's identity), each rank's dropout stream is derived anew (`rank_seed`)."""
        state = self._read_state() if self.is_main else None
        if self.world_size > 1:
            state = distributed.broadcast_object(state)
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.history = History(**state["history"])
        self._resume_rng = (state["rng_cpu"], state["rng_cuda"])
        self._resume_dropout, self._reseed = None, False
        if self.world_size > 1:
            if state.get("world_size", 1) == self.world_size and state.get("rng_ranks"):
                self._resume_dropout = tuple(state["rng_ranks"][self.rank])
            else:  # the dropout streams of another number of processes cannot be restored
                self._reseed = True
        self._resume_seed = state["epoch_seed"]
        self._saved_step = self.step
        if self.trained:  # a failure after training: only the outputs are left to write
            self.log(f"resuming from {self.state_path}: step {self.step}, training is complete")
        else:
            self.log(f"resuming from {self.state_path}: epoch {self.epoch + 1}, step {self.step}")
        return True

    @contextmanager
    def _dropout_stream(self):
        """Several processes: torch's global CPU RNG is this rank's dropout stream in the block (a
        training step's forward and backward passes). On CUDA dropout draws from the GPU's generator,
        which nothing else uses: it is seeded per rank and left in place."""
        if self.dropout_rng is None:
            yield
            return
        data = torch.get_rng_state()
        torch.set_rng_state(self.dropout_rng.get_state())
        try:
            yield
        finally:
            self.dropout_rng.set_state(torch.get_rng_state())
            torch.set_rng_state(data)

    def _seed_dropout(self, seed: int) -> None:
        self.dropout_rng.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def _dropout_states(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        return self.dropout_rng.get_state(), cuda

    @property
    def trained(self) -> bool:
        """Whether training is complete: `max_steps` steps when set, else `num_epochs` epochs."""
        if self.max_steps is not None:
            return self.step >= self.max_steps
        return self.epoch >= self.s.num_epochs

    def _restore_rng(self) -> None:
        """The RNG states of the interrupted run: torch's global RNG, and each rank's dropout stream
        when saved by as many processes (otherwise derived anew: see the loop)."""
        torch.set_rng_state(self._resume_rng[0])
        if self._resume_rng[1]:
            torch.cuda.set_rng_state_all(self._resume_rng[1])
        if self._resume_dropout is not None:
            cpu, cuda = self._resume_dropout
            self.dropout_rng.set_state(cpu)
            if cuda and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda[0], self.device)

    def clear_state(self) -> None:
        """Remove the resume state: call it once every output of the run is written."""
        if self.state_path and self.is_main:
            self.state_path.unlink(missing_ok=True)
            self._saved_step = None

    # --- one run at a time -----------------------------------------------------------------------
    @property
    def lock_path(self) -> Path | None:
        return self.state_path.with_name(self.state_path.name + ".lock") if self.state_path else None

    def _acquire(self) -> bool:
        """Take `<state_path>.lock` unless held; whether this call took it."""
        if self._lock is not None or not (self.state_path and self.is_main):
            return False
        stack = ExitStack()
        stack.enter_context(exclusive_lock(self.lock_path))  # LockHeld: another run of this stage
        self._lock = stack
        return True

    def _release(self) -> None:
        if self._lock is not None:
            self._lock, stack = None, self._lock
            stack.close()

    def __enter__(self) -> Trainer:
        """Hold the lock for the block; on success, remove the resume state (outputs are written)."""
        self._acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.clear_state()
        finally:
            self._release()

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> History:
        """Train (resuming a saved state of this run), save the final state, return the History."""
        took = self._acquire()
        try:
            self._fit()
        finally:
            if took:
                self._release()
        return self.history

    def _fit(self) -> None:
        resumed = self.try_resume()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            if self._stop_requested:  # second Ctrl-C: stop now
                signal.signal(signum, previous[signum])
                raise KeyboardInterrupt
            self.log(f"signal {signum}: finishing this step, then saving a checkpoint")
            self.request_stop()

        try:
            for sig in previous:
                signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: no signal handling
            previous = {}
        try:
            self._loop(resumed)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.total_steps > 0:  # kept until the caller has written its outputs (clear_state)
            self._save_or_warn()

    def _loop(self, resumed: bool) -> None:
        s, model, opt = self.s, self.model, self.optimizer
        step_model = self.step_model  # DDP averages the gradients; evaluation runs the module itself
        bar = progress_bar(
            total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress
        )
        model.train()
        start = time.perf_counter()
        base_seconds = self.history.train_seconds
        if self.total_steps == 0:  # no training: measure the starting weights (e.g. GPT-2 as the book loads it)
            self._record(0.0, bar)
        while not self.trained:
            skip = self.batches_done
            if resumed and skip:  # mid-epoch: this epoch's order, from the first batch not done
                self.sampler.resume(self._resume_seed, skip * s.batch_size)
            elif resumed:  # at an epoch boundary: the RNG as it was, so the new epoch draws its order
                self._restore_rng()
                resumed = False
            batches = iter(self.train_loader)  # draws from the global RNG, as the book's loop does
            # Several processes: every rank's dropout stream of the epoch is seeded from the epoch's seed
            # and the rank, once its first batch is drawn (the sampler draws the seed) ...
            seed_ranks = self.world_size > 1
            if resumed:  # ... so put the RNG back where the interrupted run had it
                self._restore_rng()
                if self._reseed:  # mid-epoch on another number of processes: the stream anew, at this step
                    self._seed_dropout(rank_seed(self._resume_seed, self.rank, self.step))
                seed_ranks = resumed = False
            accumulated = 0
            losses = []
            for micro, batch in enumerate(batches, start=skip):
                if seed_ranks:
                    self._seed_dropout(rank_seed(self.sampler.seed, self.rank))
                    seed_ranks = False
                if accumulated == 0:
                    opt.zero_grad(set_to_none=True)
                    losses = []
                last_in_epoch = micro + 1 == len(self.train_loader)
                syncs = accumulated + 1 == s.grad_accum_steps or last_in_epoch  # the step's last micro-batch
                with self._dropout_stream(), nullcontext() if syncs or self.ddp is None else self.ddp.no_sync():
                    loss = self.loss_fn(step_model, batch, self.device, s.precision)
                    (loss / s.grad_accum_steps).backward()
                losses.append(loss.detach())
                accumulated += 1
                self.history.total_tokens += batch[0].numel() * self.world_size
                self.history.total_examples += len(batch[0]) * self.world_size
                self.batches_done = micro + 1
                if not syncs:
                    continue
                accumulated = 0
                self._check_finite(losses, bar)  # one sync per step, before the update
                if self.scheduled:
                    lr = lr_at(self.step, self.total_steps, s)
                    for group in opt.param_groups:
                        group["lr"] = lr
                else:
                    lr = opt.param_groups[0]["lr"]
                if s.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
                opt.step()
                if self.step % s.eval_freq == 0:
                    self._record(lr, bar)
                self.step += 1
                self.history.steps = self.step
                self.history.train_seconds = base_seconds + time.perf_counter() - start
                bar.update(1)
                budget_spent = self.max_steps is not None and self.step >= self.max_steps
                if last_in_epoch or budget_spent:  # checkpoint after on_epoch_end, which may draw from the RNG
                    self.epoch += 1
                    self.batches_done = 0
                    break
                self._checkpoint(bar)
            if self.batches_done:  # the loader stopped short of its len(): the epoch would never end
                raise LLMError(
                    f"the training loader yielded {self.batches_done} of its {len(self.train_loader)} batches"
                )
            if self.on_epoch_end and self.is_main:
                row = self.on_epoch_end(model, self.epoch)
                if isinstance(row, dict):
                    self.history.epoch_metrics.append(row)
                model.train()
            self._checkpoint(bar)
        if resumed:  # resumed at the end: what follows training sees the RNG of an uninterrupted run
            self._restore_rng()
        bar.close()

    def _checkpoint(self, bar) -> None:
        """After a step (after on_epoch_end at the end of an epoch): a requested stop, or a periodic save."""
        stop = self._stop_requested
        if self.world_size > 1:  # a signal reaches the ranks at different steps: stop them all at the same one
            # (into a local: a signal handled during the all-reduce sets the flag for the next step)
            stop = distributed.sum_over_ranks(float(stop))[0] > 0
        if stop:
            bar.close()
            self._interrupt()
        if self.s.checkpoint_every and self.step % self.s.checkpoint_every == 0:
            self._save_or_warn()

    def _check_finite(self, losses: list[torch.Tensor], bar) -> None:
        """Raise NonFiniteLoss if a micro-batch of the step about to be taken had a NaN or inf loss."""
        finite = bool(torch.isfinite(torch.stack(losses)).all())
        if self.world_size > 1:  # every rank stops, or none
            finite = distributed.sum_over_ranks(float(not finite))[0] == 0
        if finite:
            return
        bar.close()
        value = next((x.item() for x in losses if not math.isfinite(x.item())), "non-finite on another rank")
        if self._saved_step is not None:
            kept = f"the last good resume state is {self.state_path} (step {self._saved_step})"
        else:
            kept = "no resume state was saved"
        raise NonFiniteLoss(
            f"training stopped at step {self.step + 1} (epoch {self.epoch + 1}): the loss is {value}; {kept}; "
            "a lower learning rate or gradient clipping may help"
        )

    def _record(self, lr: float, bar) -> None:
        train_loss, val_loss, extra = self.evaluate(self.s.eval_iter)
        h = self.history
        h.step.append(self.step)
        h.epoch.append(self.epoch + 1)
        h.tokens_seen.append(h.total_tokens)
        h.examples_seen.append(h.total_examples)
        h.train_loss.append(train_loss)
        h.val_loss.append(val_loss)
        h.lr.append(lr)
        for name, value in extra.items():
            h.extra.setdefault(name, []).append(value)
        if self.on_record and self.is_main:
            self.on_record(h)
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        self.log(f"Ep {self.epoch + 1} (Step {self.step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
