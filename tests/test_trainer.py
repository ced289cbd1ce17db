"""The training loop: the book's losses step for step, resume equality, determinism, schedules."""

import os
import signal

import numpy as np
import pytest
import torch

from llm.data import TokenWindowDataset
from llm.errors import LLMError
from llm.loaders import EpochSampler, Loaders, make_loaders
from llm.model import GPTModel
from llm.schedule import lr_at
from llm.settings import LoopSettings
from llm.trainer import Trainer, TrainingInterrupted, lm_loss
from tests import book_reference as book
from tests.conftest import tiny_cfg

CFG = tiny_cfg(vocab_size=211, context_length=16, drop_rate=0.1)


def settings(**kw):
    base = dict(
        seed=123, num_epochs=3, batch_size=2, lr=4e-4, weight_decay=0.1,
        eval_freq=2, eval_iter=2, warmup_steps=0, lr_schedule="constant", min_lr=0.0, grad_clip=0.0,
        grad_accum_steps=1, precision="fp32", device="cpu", checkpoint_every=0,
    )  # fmt: skip
    base.update(kw)
    return LoopSettings(**base)


def datasets(n_train=400, n_val=70):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG["vocab_size"], n_train + n_val).astype(np.uint16)
    return TokenWindowDataset(ids[:n_train], 16, 16), TokenWindowDataset(ids[n_train:], 16, 16)


def fresh_model(seed=123):
    torch.manual_seed(seed)
    return GPTModel(CFG)


def run(s, **kw):
    train, val = datasets()
    torch.manual_seed(s.seed)
    model = GPTModel(CFG)
    trainer = Trainer(model, make_loaders(train, val, s), s, progress=False, log=lambda m: None, **kw)
    return model, trainer.fit()


def test_losses_equal_the_books_train_model_simple_step_for_step():
    s = settings()
    train, val = datasets()
    torch.manual_seed(123)
    ref = book.GPTModel(CFG)
    ref_train = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, drop_last=True)
    ref_val = torch.utils.data.DataLoader(val, batch_size=2, shuffle=False, drop_last=False)
    opt = torch.optim.AdamW(ref.parameters(), lr=4e-4, weight_decay=0.1)
    book_train, book_val, book_seen = book.train_model_simple(
        ref, ref_train, ref_val, opt, "cpu", 3, 2, 2, "Every effort", None
    )
    _, history = run(s)
    assert history.tokens_seen == book_seen
    # same init, data order and dropout masks; only float rounding differs (fused kernels)
    np.testing.assert_allclose(history.train_loss, book_train, atol=2e-4)
    np.testing.assert_allclose(history.val_loss, book_val, atol=2e-4)


def test_same_seed_same_result_and_other_seed_differs():
    a_model, a = run(settings())
    b_model, b = run(settings())
    _, c = run(settings(seed=7))
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    assert all(torch.equal(x, y) for x, y in zip(a_model.parameters(), b_model.parameters(), strict=True))
    assert c.train_loss != a.train_loss


def _interrupt_at(step, how="request"):
    holder = {}

    def evaluate_fn(model):
        trainer = holder["trainer"]
        if trainer.step == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                trainer.request_stop()
        return {}

    return holder, evaluate_fn


@pytest.mark.parametrize("stop_step, how", [(4, "request"), (6, "signal")])
def test_resume_after_interrupt_ends_with_identical_weights(tmp_path, stop_step, how):
    """A stop at every step, with accumulation and periodic checkpoints: tests/test_resume.py."""
    s = settings(eval_freq=1)
    full_model, full = run(s, evaluate_fn=lambda m: {})
    train, val = datasets()
    state = tmp_path / "state.pt"
    holder, evaluate_fn = _interrupt_at(stop_step, how)
    torch.manual_seed(s.seed)
    first = Trainer(GPTModel(CFG), make_loaders(train, val, s), s, evaluate_fn=evaluate_fn, state_path=state,
                    run_id="r", progress=False, log=lambda m: None)  # fmt: skip
    holder["trainer"] = first
    with pytest.raises(TrainingInterrupted, match=f"interrupted at step {stop_step + 1}"):
        first.fit()
    assert state.is_file()
    # a new process: the same starting weights (the state is theirs only), another global RNG state
    model = fresh_model(s.seed)
    torch.manual_seed(999)
    trainer = Trainer(model, make_loaders(train, val, s), s, evaluate_fn=lambda m: {}, state_path=state, run_id="r",
                      progress=False, log=lambda m: None)  # fmt: skip
    with trainer:
        resumed = trainer.fit()
        assert state.is_file()  # kept while the stage writes its outputs
    assert not state.exists()  # then removed
    assert resumed.train_loss == full.train_loss and resumed.step == full.step
    for (name, a), b in zip(model.named_parameters(), full_model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_state_of_another_run_is_ignored(tmp_path):
    s = settings(num_epochs=1)
    train, val = datasets()
    state = tmp_path / "state.pt"
    holder, evaluate_fn = _interrupt_at(2)
    t = Trainer(fresh_model(), make_loaders(train, val, s), s, evaluate_fn=evaluate_fn, state_path=state, run_id="a",
                progress=False, log=lambda m: None)  # fmt: skip
    holder["trainer"] = t
    with pytest.raises(TrainingInterrupted):
        t.fit()
    messages = []
    other = Trainer(
        fresh_model(), make_loaders(train, val, s), s, state_path=state, run_id="b", progress=False, log=messages.append
    )
    assert not other.try_resume() and "other params" in messages[0]


def test_periodic_checkpoints_are_written(tmp_path):
    s = settings(num_epochs=1, checkpoint_every=3)
    train, val = datasets()
    state = tmp_path / "state.pt"
    seen = []

    def evaluate_fn(model):
        seen.append(state.exists())
        return {}

    trainer = Trainer(fresh_model(), make_loaders(train, val, s), s, evaluate_fn=evaluate_fn, state_path=state,
                      run_id="x", progress=False, log=lambda m: None)  # fmt: skip
    trainer.fit()
    assert not seen[0] and any(seen)  # appears after step 3
    assert torch.load(state, weights_only=True)["step"] == trainer.total_steps  # the final state is kept
    trainer.clear_state()
    assert not state.exists()


def test_grad_accumulation_equals_a_bigger_batch_without_dropout():
    global CFG
    saved, CFG = CFG, {**CFG, "drop_rate": 0.0}
    try:
        small_model, _ = run(settings(batch_size=2, grad_accum_steps=2, num_epochs=1, eval_freq=100))
        big_model, _ = run(settings(batch_size=4, num_epochs=1, eval_freq=100))
    finally:
        CFG = saved
    # 12 windows of the same shuffled order: 3 steps of 4, either way
    for a, b in zip(small_model.parameters(), big_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipping_and_schedule_change_the_run():
    _, plain = run(settings(num_epochs=1))
    _, clipped = run(settings(num_epochs=1, grad_clip=1e-3))
    assert clipped.train_loss != plain.train_loss


def test_lr_schedule():
    s = settings(lr=1.0, warmup_steps=4, lr_schedule="cosine", min_lr=0.1)
    assert [lr_at(i, 20, s) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, s) == pytest.approx(1.0)
    assert lr_at(12, 20, s) == pytest.approx(0.55)
    assert lr_at(20, 20, s) == pytest.approx(0.1)
    assert lr_at(7, 20, settings(lr=0.3)) == 0.3  # the book: constant


def test_sampler_matches_random_sampler_and_splits_by_rank():
    torch.manual_seed(5)
    expected = list(torch.utils.data.RandomSampler(range(10)))
    torch.manual_seed(5)
    assert list(EpochSampler(10, shuffle=True)) == expected
    parts = []
    for rank in range(2):  # every rank seeds alike, so all draw the same permutation
        torch.manual_seed(5)
        parts.append(list(EpochSampler(10, True, rank=rank, world_size=2)))
    assert parts[0] == expected[0::2]
    assert sorted(parts[0] + parts[1]) == list(range(10)) and len(parts[0]) == 5


def test_too_little_data_is_a_clear_error():
    train, val = datasets(n_train=40)
    with pytest.raises(LLMError, match="too few for one batch"):
        make_loaders(train, val, settings(batch_size=8))


def test_on_record_sees_every_evaluation_as_it_happens():
    """The stages rewrite their curve file here: while training runs it holds every point so far."""
    seen = []
    _, history = run(settings(num_epochs=2), on_record=lambda h: seen.append(len(h.rows())))
    assert seen == list(range(1, len(history.rows()) + 1)) and len(seen) > 2


def test_training_interrupted_exits_130_and_is_an_llm_error():
    assert TrainingInterrupted.exit_code == 130 and issubclass(TrainingInterrupted, LLMError)


def loaders(batch_size=2):
    train, val = datasets()
    return (
        torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
        torch.utils.data.DataLoader(val, batch_size=batch_size),
    )


def test_given_loaders_and_optimizer_run_and_keep_the_optimizers_lr():
    train_loader, val_loader = loaders()
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    s = LoopSettings(num_epochs=1, eval_freq=4, eval_iter=1, device="cpu", lr=5.0)  # a constant lr is never written
    history = Trainer(model, Loaders.given(train_loader, val_loader), s, optimizer=opt,
                      progress=False, log=lambda m: None).fit()  # fmt: skip
    assert history.steps == len(train_loader) == 12 and history.step == [0, 4, 8]
    assert opt.param_groups[0]["lr"] == 1e-3 and history.lr == [1e-3] * 3
    warm = LoopSettings(num_epochs=1, eval_freq=4, eval_iter=1, device="cpu", lr=2e-3, warmup_steps=100)
    Trainer(model, Loaders.given(train_loader, val_loader), warm, optimizer=opt,
            progress=False, log=lambda m: None).fit()  # fmt: skip
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 12 / 100)  # a schedule is written


def test_given_loaders_refuse_resume_state_and_an_empty_loader(tmp_path):
    train_loader, val_loader = loaders()
    train, val = datasets()
    s = LoopSettings(num_epochs=1, eval_freq=1, eval_iter=1, device="cpu")
    with pytest.raises(LLMError, match="resumable checkpoints"):
        Trainer(fresh_model(), Loaders.given(train_loader, val_loader), s, state_path=tmp_path / "state.pt")
    with pytest.raises(LLMError, match="yields no batches"):
        empty = torch.utils.data.DataLoader(train, batch_size=len(train) + 1, drop_last=True)
        Trainer(fresh_model(), Loaders.given(empty, val_loader), s)


# --- train.compile -----------------------------------------------------------------------------------
# The suite compiles with `aot_eager` (TorchDynamo + AOTAutograd, no C++ compiler): the graphs the training
# steps run, traced, without the minute of inductor code generation a 2-core machine spends. Measured here
# (torch 2.13 CPU, this model, 12 steps): aot_eager gives eager's losses and weights exactly; inductor's
# differ by at most 2.4e-7.
COMPILE_TOLERANCE = 1e-6


def test_compile_trains_like_eager_and_saves_the_plain_module(tmp_path, monkeypatch):
    import functools

    from llm.checkpoint import weights_state_dict
    from llm.pipeline.params import InstructParams, SpamParams, TrainParams

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        s = TrainParams(num_epochs=1, batch_size=2, eval_freq=2, eval_iter=2, device="cpu", compile=compiled).settings()
        train, val = datasets()
        torch.manual_seed(123)
        model = GPTModel({**CFG, "drop_rate": 0.0})  # inductor draws its own dropout masks: compare without
        seen = []

        def loss_fn(m, batch, device, precision, seen=seen):
            seen.append(type(m).__name__)
            return lm_loss(m, batch, device, precision)

        def hook(m, epoch, seen=seen):
            seen.append(f"hook {type(m).__name__}")

        state = tmp_path / f"{compiled}.pt"
        trainer = Trainer(model, make_loaders(train, val, s), s, loss_fn=loss_fn, on_epoch_end=hook, state_path=state,
                          progress=False, log=lambda m: None)  # fmt: skip
        history = trainer.fit()
        runs[compiled] = (model, history, seen, torch.load(state, weights_only=True))
    (eager, h0, seen0, _), (model, h1, seen1, state) = runs[False], runs[True]
    assert h1.steps == h0.steps == 12 and h1.step == h0.step
    np.testing.assert_allclose(h1.train_loss, h0.train_loss, rtol=0, atol=COMPILE_TOLERANCE)
    np.testing.assert_allclose(h1.val_loss, h0.val_loss, rtol=0, atol=COMPILE_TOLERANCE)
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=COMPILE_TOLERANCE), name
    # training steps through the compiled module; evaluation (2 x 2 batches, 6 times) through the model itself
    assert seen1.count("OptimizedModule") == 12 and seen1.count("GPTModel") == 6 * 4
    assert seen1[-1] == "hook GPTModel" and set(seen0) == {"GPTModel", "hook GPTModel"}
    assert state["model"].keys() == weights_state_dict(eager).keys()  # no `_orig_mod.` in the saved state
    assert not any("_orig_mod" in key for key in model.state_dict())
    assert all(not cls().compile for cls in (TrainParams, SpamParams, InstructParams))  # every stage's key, off


def test_max_steps_is_a_budget_across_epochs_and_the_schedule_spans_it():
    """30 steps at 12 per epoch: two epochs and a third cut short after 6 steps (its epoch-end hook
    runs), whatever num_epochs says; warmup + cosine over the 30 steps."""
    s = settings(max_steps=30, num_epochs=1, eval_freq=1, lr_schedule="cosine", warmup_steps=2, min_lr=1e-5)
    ends = []
    model, history = run(s, on_epoch_end=lambda m, epoch: ends.append(epoch))
    assert history.steps == 30 and history.step == list(range(30)) and ends == [1, 2, 3]
    assert history.total_examples == 30 * s.batch_size and history.epoch[-1] == 3
    assert history.lr == pytest.approx([lr_at(k, 30, s) for k in range(30)])
    assert history.lr[-1] < 0.05 * s.lr  # the decay ends with the budget, not after num_epochs


def test_a_budget_of_whole_epochs_is_the_same_run_as_the_epochs():
    by_epochs_model, by_epochs = run(settings(num_epochs=3))
    by_steps_model, by_steps = run(settings(num_epochs=1, max_steps=36))  # 3 x 12 steps
    assert by_steps.train_loss == by_epochs.train_loss and by_steps.val_loss == by_epochs.val_loss
    for a, b in zip(by_steps_model.parameters(), by_epochs_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_run_with_a_budget_resumes_mid_epoch_bit_for_bit(tmp_path):
    s = settings(max_steps=30, eval_freq=1, lr_schedule="cosine", min_lr=1e-5)
    full_model, full = run(s, evaluate_fn=lambda m: {})
    train, val = datasets()
    holder, evaluate_fn = _interrupt_at(26)
    torch.manual_seed(s.seed)
    first = Trainer(GPTModel(CFG), make_loaders(train, val, s), s, evaluate_fn=evaluate_fn,
                    state_path=tmp_path / "state.pt", run_id="r", progress=False, log=lambda m: None)  # fmt: skip
    holder["trainer"] = first
    with pytest.raises(TrainingInterrupted, match="interrupted at step 27"):
        first.fit()
    model = fresh_model(s.seed)
    resumed = Trainer(model, make_loaders(train, val, s), s, evaluate_fn=lambda m: {}, state_path=tmp_path / "state.pt",
                      run_id="r", progress=False, log=lambda m: None).fit()  # fmt: skip
    assert resumed.train_loss == full.train_loss and resumed.steps == 30
    for a, b in zip(model.parameters(), full_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loop_settings_are_the_loop_params_fields_defined_once():
    """`LoopSettings` (llm/settings.py) names the loop's fields once; the params section builds it."""
    import dataclasses
    import subprocess
    import sys

    from llm.pipeline.params import LoopParams, TrainParams

    names = {f.name for f in dataclasses.fields(LoopSettings)}
    assert names - {"max_steps"} == set(LoopParams.model_fields) - {"nproc_per_node"}
    train = TrainParams(max_steps=7, compile=True)
    assert train.settings() == LoopSettings(**{k: getattr(train, k) for k in names})
    assert train.settings().device == "auto"  # params.yaml's default; LoopSettings has none:
    with pytest.raises(TypeError, match="device"):
        LoopSettings(num_epochs=1, eval_freq=1, eval_iter=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.settings().lr = 1.0
    code = "import sys, llm.settings; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # torch-free


def test_a_resume_state_is_never_unpickled(tmp_path):
    """A state file holding an arbitrary pickled object is ignored, its code not run (weights_only)."""
    state, witness = tmp_path / "state.pt", tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(witness),)

    torch.save({"run_id": "r", "payload": Payload()}, state)
    messages = []
    trainer = Trainer(fresh_model(), make_loaders(*datasets(), settings()), settings(), state_path=state, run_id="r",
                      progress=False, log=messages.append)  # fmt: skip
    assert not trainer.try_resume() and not witness.exists()
    assert messages == [f"ignoring unreadable training state {state}: UnpicklingError"]
