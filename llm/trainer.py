"""The one training loop: pretraining, both finetuning stages and the book's functions run it.

With the defaults it is the book's `train_model_simple`: same update order, same evaluation points
(`step % eval_freq == 0`, on `eval_iter` batches of a fresh shuffle of the training set and of the
validation set), same use of torch's global RNG, so a run seeded like the book's draws the same data
order and dropout masks. On top: warmup + cosine decay, clipping, accumulation, bf16 autocast,
`torch.compile`, a step budget, several processes (DDP: `llm.distributed`) and a resume state
(`llm.resume`, saved periodically, on Ctrl-C/SIGTERM and at the end) after which a resumed run ends
with the same weights and History as an uninterrupted one, whichever step it stopped at.

Several processes: `batch_size` is per process, every rank takes its shard of each epoch
(`llm.loaders`), evaluation averages the ranks' losses (every rank records the same History), only
rank 0 runs the hooks, logs and writes, and a stop or a non-finite loss on any rank stops all of them
at the same step. A state saved by N processes resumes on M with as many examples per micro-batch over
all of them; on another number the dropout streams are derived anew (with dropout 0 the result equals
the uninterrupted run up to the order of floating-point sums).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from llm import distributed
from llm.checkpoint import weights_state_dict
from llm.errors import LLMError, first_line
from llm.loaders import Loaders
from llm.losses import calc_loss_batch, loader_means, split_loss
from llm.optim import make_optimizer
from llm.progress import progress_bar, write
from llm.resume import SAVE_ERRORS, History, StateStore, TrainState, run_fingerprint
from llm.runtime import select_device
from llm.schedule import lr_at
from llm.settings import LoopSettings

__all__ = ["History", "LoopSettings", "NonFiniteLoss", "Trainer", "TrainingInterrupted", "lm_loss", "make_optimizer"]

LossFn = Callable[[torch.nn.Module, Any, torch.device, str], Any]  # a loss, or (loss, {name: metric})
CountFn = Callable[[Any], tuple[int, int]]


def count_batch(batch) -> tuple[int, int]:
    """(tokens, examples) of a batch of inputs first: `(inputs, targets)`, as the book counts tokens seen."""
    return batch[0].numel(), len(batch[0])


class TrainingInterrupted(LLMError):
    """Training stopped on a signal after saving a resumable checkpoint."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class NonFiniteLoss(LLMError):
    """The training loss became NaN or infinite: training stopped before that step's update."""

    @classmethod
    def at(cls, step: int, epoch: int, losses: list[torch.Tensor], store: StateStore | None) -> NonFiniteLoss:
        value = next((x.item() for x in losses if not math.isfinite(x.item())), "non-finite on another rank")
        if store and store.saved_step is not None:
            kept = f"the last good resume state is {store.path} (step {store.saved_step})"
        else:
            kept = "no resume state was saved"
        return cls(
            f"training stopped at step {step + 1} (epoch {epoch + 1}): the loss is {value}; {kept}; "
            "a lower learning rate or gradient clipping may help"
        )


def lm_loss(model, batch, device, precision):
    """Next-token cross-entropy over every position (the book's `calc_loss_batch`)."""
    return calc_loss_batch(batch[0], batch[1], model, device, precision)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _reason(exc: BaseException) -> str:
    """`exc` on one line (torch's write errors span several)."""
    return f"{type(exc).__name__}: {first_line(exc)}"


@contextmanager
def stop_on_signals(trainer: Trainer):
    """In the block, SIGINT and SIGTERM ask `trainer` to stop after its current step (it saves its state
    and raises TrainingInterrupted); a second one, once a stop is asked, stops at once (KeyboardInterrupt).
    Outside the main thread signals cannot be caught: the block runs without."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame):
        if trainer.stop_requested:
            signal.signal(signum, previous[signum])
            raise KeyboardInterrupt
        trainer.log(f"signal {signum}: finishing this step, then saving a checkpoint")
        trainer.request_stop()

    try:
        for sig in previous:
            signal.signal(sig, on_signal)
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Trainer:
    """`Trainer(model, loaders, settings).fit()` → History.

    `loaders`: `llm.loaders.make_loaders(...)` (the pipeline's: sharded, resumable) or `Loaders.given(...)`
    (the book's, iterated as they are, the training loss evaluated on the training loader itself).
    `loss_fn(model, batch, device, precision)` is a batch's mean loss, or `(loss, {name: value})` with
    metrics of the batch that every evaluation averages beside the loss (recorded as `train_<name>` and
    `val_<name>`: DPO's rewards); `count_fn(batch)` its (tokens, examples) for the History's totals;
    `evaluate_fn(model)` returns extra metrics for every evaluation; `on_epoch_end(model, epoch)` runs after
    each epoch (a dict it returns is kept in `history.epoch_metrics`); `on_record(history)` after each
    evaluation (a stage rewrites its curve there). A given `optimizer` is used as is: a constant lr without
    warmup is never written to it.

    `state_path` enables the resume state; `run_id` (e.g. the params), with hashes of the starting
    weights and data, tells this run's state from another's. `fit()` saves the final state and keeps it;
    `with trainer: history = trainer.fit(); <write outputs>` holds `<state_path>.lock` (a second run of
    the stage stops at once) and removes the state only when the block succeeds.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loaders: Loaders,
        settings: LoopSettings,
        loss_fn: LossFn = lm_loss,
        count_fn: CountFn = count_batch,
        evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        on_epoch_end: Callable[[torch.nn.Module, int], Any] | None = None,
        on_record: Callable[[History], None] | None = None,
        state_path: str | os.PathLike | None = None,
        run_id: Any = None,
        progress: bool = True,
        log: Callable[[str], None] = write,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        if state_path is not None and loaders.sampler is None:
            raise LLMError(
                "resumable checkpoints (state_path) need the loaders of llm.loaders.make_loaders: "
                "the data order of a given DataLoader cannot be saved and restored"
            )
        if len(loaders.train) == 0:
            raise LLMError("the training loader yields no batches")
        self.s, self.loaders, self.sampler = settings, loaders, loaders.sampler
        self.rank, self.world_size = loaders.rank, loaders.world_size
        self.is_main = self.rank == 0
        self.progress, self.log = progress and self.is_main, log if self.is_main else _quiet
        self.store: StateStore | None = None
        self.state_path = Path(state_path) if state_path else None
        if state_path:  # before moving to the device: the weights a run starts from
            micro_batch = settings.batch_size * self.world_size
            run = run_fingerprint(run_id, model, loaders.train.dataset, loaders.val.dataset, micro_batch)
            self.store = StateStore(state_path, run, self.log, self.rank, self.world_size)
        self.device = select_device(settings.device)
        if self.device.type == "cuda" and self.device.index is None and self.world_size > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())  # DDP: the rank's GPU
        self.model = model.to(self.device)
        self.ddp = distributed.wrap_ddp(self.model, self.device) if self.world_size > 1 else None
        self.dropout = distributed.DropoutStreams(self.rank, self.world_size, self.device)
        # The training steps run the DDP wrap (if any), compiled with `compile`; evaluation, the hooks and
        # every saved state use `self.model` itself.
        self.step_model = self.ddp or self.model
        if settings.compile:
            self.step_model = torch.compile(self.step_model)
        self.loss_fn, self.count_fn, self.evaluate_fn = loss_fn, count_fn, evaluate_fn
        self.on_epoch_end, self.on_record = on_epoch_end, on_record
        if optimizer is None:
            optimizer = make_optimizer(self.model, settings.lr, settings.weight_decay, settings.optimizer)
        self.optimizer = optimizer
        # A constant rate without warmup is never written into the optimizer: a given optimizer keeps its own.
        self.scheduled = bool(settings.warmup_steps) or settings.lr_schedule != "constant"
        # A step budget (`max_steps`) instead of epochs: the epochs go on as needed, the last may end early,
        # and the lr schedule spans the budget.
        self.total_steps = (
            settings.max_steps or math.ceil(len(loaders.train) / settings.grad_accum_steps) * settings.num_epochs
        )
        self.history = History()
        self.step = 0  # optimizer steps done
        self.epoch = 0  # epochs completed
        self.batches_done = 0  # micro-batches done in the current epoch
        self.stop_requested = False

    @property
    def trained(self) -> bool:
        """Whether training is complete: `max_steps` steps when set, else `num_epochs` epochs."""
        if self.s.max_steps is not None:
            return self.step >= self.s.max_steps
        return self.epoch >= self.s.num_epochs

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> History:
        """Train (resuming a saved state of this run), save the final state, return the History."""
        took = self.store.lock() if self.store else False
        try:
            resumed = self._load()
            with stop_on_signals(self):
                self._loop(resumed)
            if self.total_steps > 0:  # kept until the caller has written its outputs (clear_state)
                self._save_or_warn()
        finally:
            if took:
                self.store.unlock()
        return self.history

    def _loop(self, resumed: TrainState | None) -> None:
        s = self.s
        bar = progress_bar(
            total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress
        )
        self.model.train()
        start, base_seconds = time.perf_counter(), self.history.train_seconds
        if self.total_steps == 0:  # no training: measure the starting weights (e.g. GPT-2 as the book loads it)
            self._record(0.0, bar)
        while not self.trained:
            first = self.batches_done
            batches = self._epoch_batches(resumed)
            resumed = None
            accumulated, losses = 0, []
            for micro, batch in enumerate(batches, start=first):
                if accumulated == 0:
                    self.optimizer.zero_grad(set_to_none=True)
                    losses = []
                last_in_epoch = micro + 1 == len(self.loaders.train)
                step_ends = accumulated + 1 == s.grad_accum_steps or last_in_epoch
                # DDP averages the gradients in the backward pass of a step's last micro-batch only
                sync = nullcontext() if step_ends or self.ddp is None else self.ddp.no_sync()
                with self.dropout.active(), sync:
                    loss, _ = split_loss(self.loss_fn(self.step_model, batch, self.device, s.precision))
                    (loss / s.grad_accum_steps).backward()
                losses.append(loss.detach())
                accumulated += 1
                tokens, examples = self.count_fn(batch)
                self.history.total_tokens += tokens * self.world_size
                self.history.total_examples += examples * self.world_size
                self.batches_done = micro + 1
                if not step_ends:
                    continue
                accumulated = 0
                lr = self._update(losses, bar)
                if self.step % s.eval_freq == 0:
                    self._record(lr, bar)
                self.step += 1
                self.history.steps = self.step
                self.history.train_seconds = base_seconds + time.perf_counter() - start
                bar.update(1)
                if last_in_epoch or self.trained:  # checkpoint after on_epoch_end, which may draw from the RNG
                    self.epoch += 1
                    self.batches_done = 0
                    break
                self._checkpoint(bar)
            if self.batches_done:  # the loader stopped short of its len(): the epoch would never end
                raise LLMError(
                    f"the training loader yielded {self.batches_done} of its {len(self.loaders.train)} batches"
                )
            if self.on_epoch_end and self.is_main:
                row = self.on_epoch_end(self.model, self.epoch)
                if isinstance(row, dict):
                    self.history.epoch_metrics.append(row)
                self.model.train()
            self._checkpoint(bar)
        if resumed:  # resumed at the end: what follows training sees the RNG of an uninterrupted run
            resumed.restore_rng(self.dropout, self.world_size, self.rank)
        bar.close()

    def _epoch_batches(self, resumed: TrainState | None):
        """This epoch's batches from the first not yet done, the RNG (and several processes' dropout
        streams) where an uninterrupted run has them. `resumed`: the state this run resumes from, at the
        first epoch the loop runs after a resume; None at every other."""
        if resumed and not self.batches_done:  # at an epoch boundary: the RNG as it was, the epoch draws its order
            resumed.restore_rng(self.dropout, self.world_size, self.rank)
            resumed = None
        if resumed:  # mid-epoch: this epoch's order, from the first batch not done
            self.sampler.resume(resumed.epoch_seed, self.batches_done * self.s.batch_size)
        batches = iter(self.loaders.train)  # draws from the global RNG, as the book's loop does
        if resumed is None:  # a fresh epoch: its dropout streams seeded from its permutation's seed
            return self.dropout.seeded_at_first_batch(batches, lambda: self.sampler.seed)
        # mid-epoch: the RNG (and dropout streams) where the interrupted run had them, undoing iter's draw
        resumed.restore_rng(self.dropout, self.world_size, self.rank)
        if resumed.own_dropout(self.world_size, self.rank) is None:  # saved by another number of processes:
            self.dropout.seed(resumed.epoch_seed, self.step)  # the streams anew, at this step
        return batches

    def _update(self, losses: list[torch.Tensor], bar) -> float:
        """The optimizer step (its lr as scheduled, gradients clipped) after the step's last micro-batch."""
        self._check_finite(losses, bar)  # one sync per step, before the update
        if self.scheduled:
            lr = lr_at(self.step, self.total_steps, self.s)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        else:
            lr = self.optimizer.param_groups[0]["lr"]
        if self.s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
        self.optimizer.step()
        return lr

    def _check_finite(self, losses: list[torch.Tensor], bar) -> None:
        """Raise NonFiniteLoss if a micro-batch of the step about to be taken had a NaN or inf loss."""
        finite = bool(torch.isfinite(torch.stack(losses)).all())
        if self.world_size > 1:  # every rank stops, or none
            finite = distributed.sum_over_ranks(float(not finite))[0] == 0
        if not finite:
            bar.close()
            raise NonFiniteLoss.at(self.step, self.epoch, losses, self.store)

    # --- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, num_batches: int | None) -> tuple[float, float, dict[str, float]]:
        """(train loss, val loss, extra metrics) on the first `num_batches` batches, in eval mode: the
        loss function's own metrics per split (`train_<name>`, `val_<name>`), then `evaluate_fn`'s."""
        self.model.eval()
        train = self._means(self.loaders.train_eval, num_batches)
        val = self._means(self.loaders.val, num_batches, names=list(train))
        extra = {f"{split}_{name}": value for split, means in (("train", train), ("val", val))
                 for name, value in means.items() if name != "loss"}  # fmt: skip
        if self.evaluate_fn:
            extra.update(self.evaluate_fn(self.model))
        self.model.train()
        return train["loss"], val["loss"], extra

    def _means(self, loader, num_batches: int | None, names: list[str] | None = None) -> dict[str, float]:
        """The loader's means (`loader_means`); with several processes, over every rank's batches. `names`:
        the metrics to reduce, which every rank must agree on (a rank's empty validation shard reports none:
        the training shards, never empty, name them)."""
        means = loader_means(loader, self.model, self.device, num_batches, self.s.precision, self.loss_fn)
        if self.world_size == 1:
            return means
        n = len(loader) if num_batches is None else min(num_batches, len(loader))  # batches this rank ran
        names = names or list(means)  # the loss function's order: the curve's columns as with one process
        *totals, count = distributed.sum_over_ranks(*(means[k] * n if n else 0.0 for k in names), n)
        return {k: total / count if count else float("nan") for k, total in zip(names, totals, strict=True)}

    def _record(self, lr: float, bar) -> None:
        started = time.perf_counter()
        train_loss, val_loss, extra = self.evaluate(self.s.eval_iter)
        self.history.record(self.step, self.epoch + 1, train_loss, val_loss, lr, extra)
        self.history.eval_seconds += time.perf_counter() - started
        if self.on_record and self.is_main:
            self.on_record(self.history)
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        self.log(f"Ep {self.epoch + 1} (Step {self.step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

    def process_metrics(self) -> dict[str, int]:
        """With several processes, the examples per optimizer step over all of them (`global_batch`)
        and their number, for a stage's metrics; nothing with one (its metrics files stay as they were)."""
        if self.world_size == 1:
            return {}
        global_batch = self.s.batch_size * self.world_size * self.s.grad_accum_steps
        return {"global_batch": global_batch, "processes": self.world_size}

    # --- the resume state (`llm.resume`) -------------------------------------------------------------
    @property
    def lock_path(self) -> Path | None:
        return self.store.lock_path if self.store else None

    def try_resume(self) -> bool:
        """Load the saved state if it belongs to this run; whether training resumes."""
        return self._load() is not None

    def _load(self) -> TrainState | None:
        """The saved state of this run, its weights, optimizer, position and History put in place (the
        loop takes back the data order and the RNG); None when training starts over."""
        state = self.store.load() if self.store else None
        if state is None:
            return None
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.step, self.epoch, self.batches_done = state.step, state.epoch, state.batches_done
        self.history = state.history
        if self.trained:  # a failure after training: only the outputs are left to write
            self.log(f"resuming from {self.state_path}: step {self.step}, training is complete")
        else:
            self.log(f"resuming from {self.state_path}: epoch {self.epoch + 1}, step {self.step}")
        return state

    def _snapshot(self, rng_ranks: list | None) -> TrainState:
        return TrainState(
            run_id=self.store.run_id,
            model=weights_state_dict(self.model),
            optimizer=self.optimizer.state_dict(),
            step=self.step,
            epoch=self.epoch,
            batches_done=self.batches_done,
            epoch_seed=self.sampler.seed,
            history=self.history,
            rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            world_size=self.world_size,
            rng_ranks=rng_ranks,
        )

    def save_state(self) -> None:
        """Write the resume state (with a state_path); raises if it cannot be written. With several
        processes every rank calls it at the same step: their dropout streams go to rank 0, which writes."""
        if self.store is None:
            return
        rng_ranks = self.dropout.gather()
        self.store.save(self._snapshot(rng_ranks) if self.is_main else None, self.step)

    def _save_or_warn(self) -> None:
        """A checkpoint on the way: one that cannot be written (a full disk) is a warning."""
        if self.store is None or self.store.saved_step == self.step:
            return
        saved = self.store.saved_step
        try:
            self.save_state()
        except SAVE_ERRORS as exc:
            kept = f"; the state of step {saved} is kept" if saved is not None else ""
            self.log(
                f"warning: could not save the resume state to {self.state_path} at step {self.step} "
                f"({_reason(exc)}){kept}; training goes on"
            )

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint, then raise TrainingInterrupted."""
        self.stop_requested = True

    def _checkpoint(self, bar) -> None:
        """After a step (after on_epoch_end at the end of an epoch): a requested stop, or a periodic save."""
        stop = self.stop_requested
        if self.world_size > 1:  # a signal reaches the ranks at different steps: stop them all at the same one
            # (into a local: a signal handled during the all-reduce sets the flag for the next step)
            stop = distributed.sum_over_ranks(float(stop))[0] > 0
        if stop:
            bar.close()
            self._interrupt()
        if self.s.checkpoint_every and self.step % self.s.checkpoint_every == 0:
            self._save_or_warn()

    def _interrupt(self) -> None:
        """Save the state and raise TrainingInterrupted (a requested stop)."""
        if self.store is None:
            raise TrainingInterrupted(f"training interrupted at step {self.step}")
        saved = self.store.saved_step
        try:
            self.save_state()
        except SAVE_ERRORS as exc:
            then = f"resumes from step {saved}" if saved is not None else "starts over"
            raise TrainingInterrupted(
                f"training interrupted at step {self.step}, but its resume state could not be saved to "
                f"{self.state_path} ({_reason(exc)}): a rerun {then}"
            ) from exc
        raise TrainingInterrupted(f"training interrupted at step {self.step}; resume state saved to {self.state_path}")

    def clear_state(self) -> None:
        """Remove the resume state: call it once every output of the run is written."""
        if self.store:
            self.store.clear()

    def __enter__(self) -> Trainer:
        """Hold the run's lock for the block; on success, remove the resume state (outputs are written)."""
        if self.store:
            self.store.lock()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.clear_state()
        finally:
            if self.store:
                self.store.unlock()
