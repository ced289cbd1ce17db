"""Resumable training: bit-identical after a stop at any step, the state kept until the outputs are
written, guarded by the starting weights and the data, one run at a time, NaN and failed writes."""

import errno
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import llm.pipeline.finetune as finetune
from llm.data import TokenWindowDataset
from llm.files import LockHeld, exclusive_lock
from llm.loaders import make_loaders
from llm.model import GPTModel
from llm.pipeline.finetune import Evaluation, FinetuneStage, Outputs, TaskData
from llm.pipeline.params import Params
from llm.resume import data_fingerprint
from llm.settings import LoopSettings
from llm.trainer import NonFiniteLoss, Trainer, TrainingInterrupted, lm_loss
from tests.conftest import ROOT, tiny_cfg

CFG = tiny_cfg(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.1)


def settings(**kw):
    """5 batches an epoch, 2 epochs; a schedule, clipping and dropout: everything a resume restores."""
    base = dict(
        seed=7, num_epochs=2, batch_size=2, lr=5e-3, weight_decay=0.1, eval_freq=3, eval_iter=1,
        warmup_steps=2, lr_schedule="cosine", min_lr=1e-4, grad_clip=1.0, grad_accum_steps=1,
        precision="fp32", device="cpu", checkpoint_every=0,
    )  # fmt: skip
    base.update(kw)
    return LoopSettings(**base)


def token_ids(n, seed):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], n).astype(np.uint16)


def datasets(train_ids=None):
    train_ids = token_ids(81, 0) if train_ids is None else train_ids  # 10 windows of 8
    return TokenWindowDataset(train_ids, 8, 8), TokenWindowDataset(token_ids(41, 1), 8, 8)


def starting_model(seed=7, tied=False):
    torch.manual_seed(seed)
    return GPTModel({**CFG, "tie_embeddings": tied})


def draw_at_epoch_end(model, epoch):
    """An on_epoch_end that uses the global RNG: a resume at an epoch boundary must replay it exactly."""
    return {"epoch": epoch, "draw": torch.rand(()).item()}


def quiet(messages=None):
    return {"progress": False, "log": (messages.append if messages is not None else lambda m: None)}


def make_trainer(s, state=None, model=None, data=None, messages=None, **kw):
    train, val = data or datasets()
    model = starting_model() if model is None else model
    return Trainer(model, make_loaders(train, val, s), s, on_epoch_end=draw_at_epoch_end, state_path=state,
                   run_id="r", **quiet(messages), **kw)  # fmt: skip


def count_steps(trainer, at=None, action=None):
    """Count optimizer steps; call `action(trainer)` before step number `at` (1-based) or after it."""
    calls = {"n": 0}
    step = trainer.optimizer.step

    def counted(*args, **kwargs):
        calls["n"] += 1
        if at is not None and calls["n"] == at and action == "crash":
            raise RuntimeError("simulated crash")
        out = step(*args, **kwargs)
        if at is not None and calls["n"] == at and action == "stop":
            trainer.request_stop()
        return out

    trainer.optimizer.step = counted
    return calls


def outcome(model, history, rng):
    h = dict(history.__dict__)
    h.pop("train_seconds")
    h.pop("eval_seconds")
    return {k: v.clone() for k, v in model.state_dict().items()}, h, rng


_FULL = {}


def uninterrupted(accum, tied=False):
    """The reference: a run with no state file at all."""
    if (accum, tied) not in _FULL:
        trainer = make_trainer(settings(grad_accum_steps=accum), model=starting_model(tied=tied))
        history = trainer.fit()
        _FULL[accum, tied] = outcome(trainer.model, history, torch.get_rng_state())
    return _FULL[accum, tied]


def assert_same(got, expected):
    weights, history, rng = got
    for name, value in expected[0].items():
        assert torch.equal(weights[name], value), name
    assert history == expected[1]
    assert torch.equal(rng, expected[2])  # what follows training draws the same numbers too


STEPS = {1: 10, 2: 6}  # 5 micro-batches an epoch: 5 steps, or 3 with accumulation 2 (2 + 2 + 1)
CASES = [(accum, "stop", k) for accum, n in STEPS.items() for k in range(1, n + 1)]
CASES += [(accum, "checkpoint", k) for accum, n in STEPS.items() for k in range(1, n)]


@pytest.mark.parametrize("accum, how, k", CASES, ids=[f"accum{a}-{h}-{k}" for a, h, k in CASES])
def test_resume_after_any_step_is_bit_identical(tmp_path, accum, how, k):
    """Stop after step k (request_stop), or crash right after a periodic checkpoint at step k:
    the rerun redoes no step and ends with the weights, History and RNG of an uninterrupted run."""
    expected = uninterrupted(accum)
    state = tmp_path / "state.pt"
    n = STEPS[accum]
    if how == "stop":
        s = settings(grad_accum_steps=accum)
        first = make_trainer(s, state)
        count_steps(first, at=k, action="stop")
        with pytest.raises(TrainingInterrupted, match=f"interrupted at step {k}; resume state saved"):
            first.fit()
    else:
        s = settings(grad_accum_steps=accum, checkpoint_every=k)
        first = make_trainer(s, state)
        count_steps(first, at=k + 1, action="crash")
        with pytest.raises(RuntimeError, match="simulated crash"):
            first.fit()
    assert torch.load(state, weights_only=True)["step"] == k

    model = starting_model()  # a rerun builds the same starting model...
    torch.manual_seed(12345)  # ... but the global RNG may be anywhere: the state restores it
    messages = []
    second = make_trainer(s, state, model=model, messages=messages)
    calls = count_steps(second)
    history = second.fit()
    assert calls["n"] == n - k  # no step done twice
    assert messages[0].startswith(f"resuming from {state}") and f"step {k}" in messages[0]
    assert_same(outcome(model, history, torch.get_rng_state()), expected)


@pytest.mark.parametrize("k", [3, 7])
def test_a_tied_model_resumes_bit_identical(tmp_path, k):
    """model.tie_embeddings: the one matrix of head and embedding, and its optimizer state, resume bit for bit."""
    expected = uninterrupted(1, tied=True)
    state, s = tmp_path / "state.pt", settings()
    first = make_trainer(s, state, model=starting_model(tied=True))
    count_steps(first, at=k, action="stop")
    with pytest.raises(TrainingInterrupted, match=f"interrupted at step {k}"):
        first.fit()
    model = starting_model(tied=True)
    torch.manual_seed(12345)
    second = make_trainer(s, state, model=model)
    history = second.fit()
    assert model.tied
    assert_same(outcome(model, history, torch.get_rng_state()), expected)
    assert not torch.equal(expected[0]["out_head.weight"], uninterrupted(1)[0]["out_head.weight"])  # not the untied run


# --- 1. the resume state outlives the outputs' writes -----------------------------------------------
def test_fit_keeps_the_final_state_and_a_failed_block_resumes_at_the_end(tmp_path):
    expected = uninterrupted(1)
    state = tmp_path / "state.pt"
    trainer = make_trainer(settings(), state)
    with pytest.raises(OSError, match="No space left"), trainer:
        trainer.fit()
        assert state.is_file() and trainer.lock_path.is_file()  # kept, and held while the stage writes
        raise OSError(errno.ENOSPC, "No space left on device")  # writing an output failed
    assert state.is_file() and not trainer.lock_path.exists()  # kept for the rerun; lock released

    model, messages = starting_model(), []
    torch.manual_seed(12345)
    rerun = make_trainer(settings(), state, model=model, messages=messages)
    calls = count_steps(rerun)
    with rerun:
        history = rerun.fit()
    assert calls["n"] == 0 and "training is complete" in messages[0]
    assert_same(outcome(model, history, torch.get_rng_state()), expected)
    assert not state.exists()  # the block succeeded: the outputs are written, the state goes

    plain = make_trainer(settings(), tmp_path / "plain.pt")
    plain.fit()  # without the block the final state stays until clear_state()
    assert (tmp_path / "plain.pt").is_file()
    plain.clear_state()
    assert not (tmp_path / "plain.pt").exists()


class TinyStage(FinetuneStage):
    """A finetuning stage on a tiny model whose `save` can fail (a full disk)."""

    section = "tiny"

    def __init__(self, root, fail=False):
        self.outputs = Outputs(root / "model", root / "curve.csv", root / "metrics.json", root / "timings.json",
                               root / "resume" / "tiny.pt")  # fmt: skip
        self.fail, self.train_batches = fail, 0

    def settings(self, params):
        return SimpleNamespace(**vars(self.loop_settings(None)), init="tiny")

    def loop_settings(self, s):
        return settings(eval_freq=2)

    def load_data(self, s):
        pass

    def datasets(self, s, data, model, tokenizer):
        train, val = datasets()
        return TaskData({"train": train, "val": val})

    def trainer_options(self, s, task):
        def loss_fn(model, batch, device, precision):
            self.train_batches += model.training
            return lm_loss(model, batch, device, precision)

        return {"loss_fn": loss_fn, "on_epoch_end": draw_at_epoch_end}

    def evaluate(self, s, task, model, history, device):
        return Evaluation({"val": {"loss": history.val_loss[-1]}, "epochs": history.epoch_metrics})

    def save(self, s, task, model, init, evaluation):
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.weights = {k: v.clone() for k, v in model.state_dict().items()}


def test_a_finetuning_stage_whose_writes_fail_resumes_at_the_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "load_params", lambda path: Params())  # the stage's own section: settings()
    monkeypatch.setattr(finetune, "read_checkpoint", lambda init: SimpleNamespace(model=lambda: starting_model(3)))
    monkeypatch.setattr(finetune, "get_tokenizer", lambda: None)
    monkeypatch.setattr(finetune, "keep_freed_memory", lambda: None)
    reference = TinyStage(tmp_path / "a")
    reference.run()

    failing = TinyStage(tmp_path / "b", fail=True)
    with pytest.raises(OSError, match="No space left"):
        failing.run()
    assert failing.outputs.state.is_file() and not failing.outputs.metrics.exists()
    rerun = TinyStage(tmp_path / "b")
    capsys.readouterr()
    rerun.run()
    assert "training is complete" in capsys.readouterr().out
    assert rerun.train_batches == 0 and reference.train_batches == failing.train_batches > 0
    for name in ("curve", "metrics"):
        assert getattr(rerun.outputs, name).read_bytes() == getattr(reference.outputs, name).read_bytes()
    assert all(torch.equal(rerun.weights[k], v) for k, v in reference.weights.items())
    assert sorted(p.name for p in (tmp_path / "b" / "resume").iterdir()) == []  # no state, no lock


# --- 3. a state belongs to its starting weights and data ----------------------------------------------
def interrupted_state(tmp_path):
    state = tmp_path / "state.pt"
    first = make_trainer(settings(), state)
    count_steps(first, at=3, action="stop")
    with pytest.raises(TrainingInterrupted):
        first.fit()
    return state


def changed(ids, at):
    ids = ids.copy()
    ids[at] = (int(ids[at]) + 1) % CFG["vocab_size"]
    return ids


@pytest.mark.parametrize(
    "change",
    ["nothing", "starting weights", "training data", "validation data"],
)
def test_a_state_is_ignored_unless_the_starting_weights_and_data_are_the_same(tmp_path, change):
    state = interrupted_state(tmp_path)
    model = starting_model(8) if change == "starting weights" else starting_model()
    train, val = datasets(changed(token_ids(81, 0), 40) if change == "training data" else None)
    if change == "validation data":
        val = TokenWindowDataset(changed(token_ids(41, 1), 5), 8, 8)
    messages = []
    trainer = make_trainer(settings(), state, model=model, data=(train, val), messages=messages)
    assert trainer.try_resume() == (change == "nothing")
    if change == "nothing":
        assert messages == [f"resuming from {state}: epoch 1, step 3"]
    else:
        assert messages == [f"ignoring training state {state}: it belongs to other params, starting weights or data"]


def test_data_fingerprint_reads_every_item_and_leaves_the_rng_alone():
    class Items(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            torch.rand(())  # a dataset may draw: the hash must not move the training's RNG
            return self.items[i]

    items = [([1, 2, 3], 2), (torch.tensor([4, 5]), torch.tensor(1)), [6]]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = data_fingerprint(Items(items))
    assert torch.equal(torch.get_rng_state(), before)
    assert a == data_fingerprint(Items([([1, 2, 3], 2), (torch.tensor([4, 5]), torch.tensor(1)), [6]]))
    assert a != data_fingerprint(Items([([1, 2, 4], 2), (torch.tensor([4, 5]), torch.tensor(1)), [6]]))
    assert a != data_fingerprint(Items([([1, 2, 3], 2), (torch.tensor([4, 5]), torch.tensor(0)), [6]]))
    assert a != data_fingerprint(Items(items[:2]))


# --- 4. a NaN or infinite loss ------------------------------------------------------------------------
def test_a_nan_loss_stops_training_and_keeps_the_last_good_state(tmp_path):
    state = tmp_path / "state.pt"
    micro = {"n": 0}

    def loss_fn(model, batch, device, precision):
        loss = lm_loss(model, batch, device, precision)
        if model.training:
            micro["n"] += 1
            if micro["n"] == 6:  # the first of step 4's two micro-batches: the check covers every one
                return loss * float("nan")
        return loss

    trainer = make_trainer(settings(grad_accum_steps=2, checkpoint_every=2), state, loss_fn=loss_fn)
    with pytest.raises(NonFiniteLoss) as info:
        trainer.fit()
    message = str(info.value)
    assert message == (
        f"training stopped at step 4 (epoch 2): the loss is nan; the last good resume state is {state} (step 2); "
        "a lower learning rate or gradient clipping may help"
    )
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # no update with NaN gradients
    assert not list(tmp_path.glob(".*.tmp")) and not trainer.lock_path.exists()


def test_a_diverging_run_stops_at_its_first_non_finite_loss(tmp_path):
    state = tmp_path / "state.pt"
    trainer = make_trainer(settings(lr=1e38, warmup_steps=0, lr_schedule="constant", grad_clip=0.0), state)
    with pytest.raises(
        NonFiniteLoss, match=r"training stopped at step \d+ \(epoch 1\): the loss is (nan|inf); no resume"
    ):
        trainer.fit()
    assert not state.exists()


# --- 5. a checkpoint that cannot be written -------------------------------------------------------------
def test_failed_periodic_checkpoints_warn_and_training_goes_on(tmp_path):
    (tmp_path / "file").write_text("a regular file where the state's directory should be")
    state = tmp_path / "file" / "state.pt"
    messages = []
    trainer = make_trainer(settings(checkpoint_every=4), state, messages=messages)
    history = trainer.fit()
    warnings = [m for m in messages if m.startswith("warning")]
    assert len(warnings) == 3 and all("\n" not in m for m in warnings)  # steps 4 and 8, and the final state
    assert warnings[0].startswith(f"warning: could not save the resume state to {state} at step 4 (")
    assert warnings[0].endswith("; training goes on")
    assert_same(outcome(trainer.model, history, torch.get_rng_state()), uninterrupted(1))


def test_a_failed_save_on_interrupt_is_one_clear_line(tmp_path, monkeypatch):
    state = tmp_path / "state.pt"
    real_save, saves = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 1:
            return real_save(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nmore lines")

    monkeypatch.setattr(torch, "save", save)
    messages = []
    trainer = make_trainer(settings(checkpoint_every=2), state, messages=messages)
    count_steps(trainer, at=6, action="stop")
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert str(info.value) == (
        f"training interrupted at step 6, but its resume state could not be saved to {state} "
        "(RuntimeError: [enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0): "
        "a rerun resumes from step 2"
    )
    assert info.value.exit_code == 130
    warnings = [m.split(" (")[0] for m in messages if m.startswith("warning")]
    assert warnings == [f"warning: could not save the resume state to {state} at step 4"]
    assert torch.load(state, weights_only=True)["step"] == 2 and not list(tmp_path.glob(".*.tmp"))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space")

    monkeypatch.setattr(torch, "save", full_disk)
    other = make_trainer(settings(), tmp_path / "other.pt")
    count_steps(other, at=1, action="stop")
    with pytest.raises(TrainingInterrupted, match=r"\(OSError: \[Errno 28\] No space\): a rerun starts over$"):
        other.fit()


# --- 7. one run at a time ---------------------------------------------------------------------------------
def test_a_second_run_of_the_same_state_stops_at_once(tmp_path):
    state = tmp_path / "state.pt"
    first = make_trainer(settings(), state)
    second = make_trainer(settings(), state)
    calls = count_steps(second)
    with first:
        with pytest.raises(
            LockHeld, match=rf"^another run holds {re.escape(str(second.lock_path))} \(pid {os.getpid()}\)$"
        ):
            second.fit()
        assert calls["n"] == 0
    second.fit()  # the first one is done: the lock is free


def test_the_lock_of_a_process_is_seen_by_another_and_dies_with_it(tmp_path):
    lock = tmp_path / "state.pt.lock"
    code = (
        "import sys; from llm.files import exclusive_lock\n"
        "with exclusive_lock(sys.argv[1]):\n print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        held = rf"^another run holds {re.escape(str(lock))} \(pid {holder.pid}\)$"
        with pytest.raises(LockHeld, match=held), exclusive_lock(lock):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    assert lock.read_text() == f"{holder.pid}\n"  # a killed holder's file stays, but its lock is gone
    with exclusive_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()
