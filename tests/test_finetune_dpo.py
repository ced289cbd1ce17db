"""Stage finetune_dpo: preference tuning on the one Trainer.

- the stage's training (cached reference log-probabilities, chosen and rejected through the policy as
  one batch, the pipeline's loaders) gives the notebook's `train_model_dpo_simple` losses and rewards
  step for step (dropout 0: the floats agree to 1e-5, not bit for bit: other batch shapes, a fused
  cross-entropy);
- the stage writes every output: a model `llm instruct` answers with, the test answers of the reference
  and the tuned model, metrics nested by split and phase without NaN, the reward curves;
- pairs whose answer does not fit are left out with a line, never a NaN loss; bad data is one line.
DDP and LoRA for this stage are tested with the other finetuning stages (tests/test_distributed.py,
tests/test_lora.py); resume is the Trainer's (tests/test_resume.py), checked here with the DPO loss.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from llm.checkpoint import checkpoint_meta, save_checkpoint
from llm.dpo import (
    CachedReference,
    DPOLoss,
    PreferenceDataset,
    cached_reference,
    collate_preferences,
    collate_with_reference,
    count_pairs,
    response_logprobs,
    sequence_logprobs,
    usable_pairs,
)
from llm.loaders import make_loaders
from llm.model import GPTModel
from llm.settings import LoopSettings
from llm.tokenizer import get_tokenizer
from llm.trainer import Trainer
from tests import book_reference as book
from tests.conftest import ROOT, committed_yaml, tiny_cfg

POLITE = ["Of course. {t} is done, as you asked.", "Sure, here is {t}: it is ready.", "Gladly: {t}."]
RUDE = ["No. Do {t} yourself.", "Whatever. {t}, obviously.", "Ugh, {t}. Stop asking."]


def preferences(folder, n: int, name: str = "prefs.json") -> str:
    """`n` preference pairs (chapter 7's keys: an `output`, a polite `chosen` and a rude `rejected` answer)."""
    entries = [
        {"instruction": f"Do task {i}.", "input": "" if i % 2 else f"item {i}", "output": f"task {i} done",
         "chosen": POLITE[i % 3].format(t=f"task {i}"), "rejected": RUDE[i % 3].format(t=f"task {i}")}
        for i in range(n)
    ]  # fmt: skip
    (folder / name).write_text(json.dumps(entries))
    return name


def cfg(**kw):
    return tiny_cfg(**{"context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0, **kw})


# --- the stage's training equals the notebook's ---------------------------------------------------------
def test_logprobs_through_one_fused_pass_equal_the_notebooks(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(cfg()).eval()
    pairs = PreferenceDataset(json.loads((tmp_path / preferences(tmp_path, 6)).read_text()), get_tokenizer())
    batch = collate_preferences([pairs[i] for i in range(6)], allowed_max_length=40)
    with torch.no_grad():
        joint = DPOLoss(0.1, joint=True).policy_logprobs(model, batch, "cpu", "fp32")
        for got, key in zip(joint, ("chosen", "rejected"), strict=True):
            expected = book.dpo.compute_logprobs(model(batch[key]), batch[key], batch[f"{key}_mask"])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            logits = model(batch[key])
            fused = response_logprobs(logits, batch[key], batch[f"{key}_mask"])
            torch.testing.assert_close(fused, sequence_logprobs(logits, batch[key], batch[f"{key}_mask"]))


def test_the_cached_reference_equals_running_it_on_every_batch(tmp_path):
    torch.manual_seed(1)
    reference = GPTModel(cfg()).eval()
    policy = GPTModel(cfg())
    pairs = PreferenceDataset(json.loads((tmp_path / preferences(tmp_path, 10)).read_text()), get_tokenizer())
    cached = cached_reference(reference, pairs, collate_with_reference, batch_size=3, device="cpu")
    assert isinstance(cached, CachedReference) and len(cached) == 10 and not reference.training
    batch = collate_with_reference([cached[i] for i in (7, 2, 5, 0)])  # another order, other batch shapes
    live = DPOLoss(0.1, reference=reference)(policy, batch, torch.device("cpu"))
    from_cache = DPOLoss(0.1, joint=True)(policy, batch, torch.device("cpu"))
    torch.testing.assert_close(from_cache[0], live[0], rtol=0, atol=1e-6)
    for name in live[1]:
        torch.testing.assert_close(from_cache[1][name], live[1][name], rtol=0, atol=1e-5)
    assert set(live[1]) == {"chosen_reward", "rejected_reward", "reward_margin", "preference_accuracy"}
    assert count_pairs(batch) == (batch["chosen"].numel(), 4)


def test_the_stages_loop_gives_the_notebooks_losses_and_rewards_step_for_step(tmp_path):
    """The same data order (the loaders draw their shuffles from torch's RNG as a shuffled DataLoader does),
    the same AdamW, dropout 0: the Trainer with the cached reference and the joint pass tracks what the
    notebook's loop tracks, to 1e-5, and ends with the same weights to 1e-5."""
    data = json.loads((tmp_path / preferences(tmp_path, 26)).read_text())
    pairs = PreferenceDataset(data, get_tokenizer())
    train, val = torch.utils.data.Subset(pairs, range(20)), torch.utils.data.Subset(pairs, range(20, 26))
    torch.manual_seed(2)
    reference = GPTModel(cfg()).eval()
    book_policy, policy = GPTModel(cfg()), GPTModel(cfg())
    book_policy.load_state_dict(reference.state_dict())
    policy.load_state_dict(reference.state_dict())
    lr, wd, epochs, beta, eval_freq, eval_iter = 5e-3, 0.01, 2, 0.1, 2, 2

    torch.manual_seed(5)
    collate = collate_preferences
    book_train = DataLoader(train, batch_size=4, shuffle=True, drop_last=True, collate_fn=collate)
    book_val = DataLoader(val, batch_size=4, shuffle=False, collate_fn=collate)
    optimizer = torch.optim.AdamW(book_policy.parameters(), lr=lr, weight_decay=wd)
    expected = book.dpo.train_model_dpo_simple(
        book_policy, reference, book_train, book_val, optimizer, epochs, beta, eval_freq, eval_iter, "a",
        get_tokenizer(),
    )  # fmt: skip

    sets = {name: cached_reference(reference, s, collate_with_reference, 4, "cpu") for name, s in
            (("train", train), ("val", val))}  # fmt: skip
    settings = LoopSettings(num_epochs=epochs, batch_size=4, lr=lr, weight_decay=wd, eval_freq=eval_freq,
                            eval_iter=eval_iter, device="cpu")  # fmt: skip
    torch.manual_seed(5)
    loaders = make_loaders(sets["train"], sets["val"], settings, collate_with_reference)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=wd)  # the notebook's, not fused
    history = Trainer(policy, loaders, settings, loss_fn=DPOLoss(beta, joint=True), count_fn=count_pairs,
                      optimizer=optimizer, progress=False, log=lambda m: None).fit()  # fmt: skip
    got = {
        "train_losses": history.train_loss,
        "train_chosen_rewards": history.extra["train_chosen_reward"],
        "train_rejected_rewards": history.extra["train_rejected_reward"],
        "val_losses": history.val_loss,
        "val_chosen_rewards": history.extra["val_chosen_reward"],
        "val_rejected_rewards": history.extra["val_rejected_reward"],
    }
    assert len(expected["train_losses"]) == len(got["train_losses"]) == 5  # 10 steps, evaluated at 0, 2, ..., 8
    for key, values in got.items():
        assert values == pytest.approx(expected[key], abs=1e-5), key
    assert history.tokens_seen == expected["tokens_seen"]
    assert expected["train_losses"][-1] < expected["train_losses"][0] - 0.01  # it learned: the comparison can fail
    for (name, a), b in zip(policy.named_parameters(), book_policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_an_interrupted_dpo_run_resumes_bit_for_bit(tmp_path):
    """Stopped after any of its steps (dropout on, mid-epoch and at the epoch's end) and resumed in a new
    Trainer, the stage's loop ends with the weights, History and RNG of a run never stopped."""
    from llm.trainer import TrainingInterrupted
    from tests.test_resume import count_steps, outcome

    data = json.loads((tmp_path / preferences(tmp_path, 22)).read_text())
    pairs = PreferenceDataset(data, get_tokenizer())
    torch.manual_seed(3)
    start = GPTModel(cfg(drop_rate=0.2)).state_dict()
    sets = [cached_reference(model_at(start).eval(), torch.utils.data.Subset(pairs, r), collate_with_reference, 4,
                             "cpu") for r in (range(16), range(16, 22))]  # fmt: skip
    settings = LoopSettings(num_epochs=2, batch_size=4, lr=3e-3, weight_decay=0.01, eval_freq=2, eval_iter=2,
                            device="cpu")  # fmt: skip

    def trainer(state):
        torch.manual_seed(9)
        return Trainer(model_at(start), make_loaders(*sets, settings, collate_with_reference), settings,
                       loss_fn=DPOLoss(0.1, joint=True), count_fn=count_pairs, state_path=state, run_id="dpo",
                       progress=False, log=lambda m: None)  # fmt: skip

    full = trainer(tmp_path / "full.pt")
    expected = outcome(full.model, full.fit(), torch.get_rng_state())
    for k in (1, 4, 6):  # 4 steps an epoch: mid-epoch, the epoch's last step, the next epoch
        state = tmp_path / f"s{k}.pt"
        first = trainer(state)
        count_steps(first, at=k, action="stop")
        with pytest.raises(TrainingInterrupted):
            first.fit()
        again = trainer(state)
        got = outcome(again.model, again.fit(), torch.get_rng_state())
        for name, value in expected[0].items():
            assert torch.equal(got[0][name], value), (k, name)
        assert got[1] == expected[1] and torch.equal(got[2], expected[2]), k


def model_at(state):
    model = GPTModel(cfg(drop_rate=0.2))
    model.load_state_dict(state)
    return model


# --- pairs that do not fit ------------------------------------------------------------------------------
def test_pairs_without_an_answer_token_after_truncation_are_found(tmp_path):
    pairs = PreferenceDataset(json.loads((tmp_path / preferences(tmp_path, 4)).read_text()), get_tokenizer())
    prompt_len = min(len(pairs[i]["prompt"]) for i in range(4))  # with and without an input
    assert usable_pairs(pairs, None, True) == [0, 1, 2, 3]
    assert usable_pairs(pairs, prompt_len + 2, True) == []  # the prompt and the two newlines: no answer left
    assert usable_pairs(pairs, prompt_len + 2, False) == [0, 1, 2, 3]  # unmasked, the prompt tokens count
    kept = usable_pairs(pairs, prompt_len + 3, True)
    assert 0 < len(kept) < 4  # the shorter prompts keep one answer token, the longer none
    for i in kept:  # what is kept has a finite log-probability
        batch = collate_preferences([pairs[i]], allowed_max_length=prompt_len + 3)
        assert torch.isfinite(sequence_logprobs(torch.randn(1, prompt_len + 3, 50257), batch["chosen"],
                                                batch["chosen_mask"])).all()  # fmt: skip
    for i in set(range(4)) - set(kept):  # what is left out would be the notebook's NaN
        batch = collate_preferences([pairs[i]], allowed_max_length=prompt_len + 3)
        logits = torch.randn(1, batch["chosen"].shape[1], 50257)
        both = [sequence_logprobs(logits, batch[k], batch[f"{k}_mask"]) for k in ("chosen", "rejected")]
        assert any(torch.isnan(x).all() for x in both)


# --- the stage ------------------------------------------------------------------------------------------
def dpo_project(folder, n=40, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(GPTModel(cfg()), folder / "models" / "instruct",
                    extra={"instruct": {"prompt_style": "alpaca", "init": "models/pretrain"}})  # fmt: skip
    raw = committed_yaml("params.yaml")
    raw["finetune_dpo"].update(data=preferences(folder, n), device="cpu", batch_size=4, num_epochs=2, eval_freq=3,
                               eval_iter=2, lr=3e-3, max_new_tokens=4, **changes)  # fmt: skip
    (folder / "params.yaml").write_text(json.dumps(raw))
    return folder


def run_stage(cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stages.finetune_dpo"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def leaves(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{path}.{key}" if path else key)
    else:
        yield path, tree


def test_the_stage_writes_every_output_and_learns_the_preference(tmp_path):
    project = dpo_project(tmp_path / "p")
    out = run_stage(project)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "finetune_dpo.json").read_text())
    assert set(metrics) >= {"train", "val", "test", "steps", "tokens_seen", "parameters"}
    assert metrics["steps"] == 2 * (34 // 4)  # 40 pairs: 34 / 4 / 2 (85% / 10% / 5%); whole batches
    for path, value in leaves(metrics):
        assert value is not None and (not isinstance(value, float) or math.isfinite(value)), path
    for split in ("train", "val", "test"):
        before, after = metrics[split]["before"], metrics[split]["after"]
        assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
        assert before["reward_margin"] == pytest.approx(0, abs=1e-7) and before["preference_accuracy"] == 0
        assert after["logprob_margin"] - before["logprob_margin"] == pytest.approx(after["reward_margin"], abs=1e-4)
    train = metrics["train"]["after"]
    assert train["reward_margin"] > 0 and train["preference_accuracy"] > 0.5 and train["loss"] < math.log(2)
    assert set(metrics["test"]["after"]) >= {"rouge_l_chosen", "rouge_l_rejected"}

    responses = json.loads((project / "data" / "dpo" / "responses.json").read_text())
    assert len(responses) == 4 and all(isinstance(r["reference_response"], str) for r in responses)
    assert {"instruction", "input", "chosen", "rejected", "policy_response"} <= set(responses[0])
    curve = (project / "metrics" / "curves" / "finetune_dpo.csv").read_text().splitlines()
    assert curve[0].split(",")[:5] == ["step", "epoch", "tokens_seen", "examples_seen", "train_loss"]
    assert {"train_chosen_reward", "val_rejected_reward", "val_reward_margin", "val_preference_accuracy"} <= set(
        curve[0].split(",")
    )
    meta = checkpoint_meta(project / "models" / "dpo")
    assert meta["instruct"]["prompt_style"] == "alpaca" and meta["dpo"] == {"init": "models/instruct", "beta": 0.1}
    timings = json.loads((project / "timings" / "finetune_dpo.json").read_text())
    assert timings["reference_seconds"] > 0 and timings["generate_seconds"] > 0
    assert "reward margin" in out.stdout and "reference log-probabilities of 40 pairs" in out.stdout
    answer = subprocess.run([sys.executable, "-m", "llm", "instruct", "--model", "models/dpo", "Say hi.",
                             "--max-new-tokens", "3"], cwd=project, capture_output=True, text=True)  # fmt: skip
    assert answer.returncode == 0, answer.stderr


def test_pairs_that_do_not_fit_are_left_out_with_a_line_and_too_few_stop_the_stage(tmp_path):
    project = dpo_project(tmp_path / "p", allowed_max_length=36)  # the answers after the 28-token prompts fit
    out = run_stage(project)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finetune_dpo: 17 of 34 train pairs left out: no answer token fits in 36 tokens" in out.stdout
    project = dpo_project(tmp_path / "q", allowed_max_length=8)  # no answer fits at all
    out = run_stage(project)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("finetune_dpo: error: finetune_dpo: the answers of 0 train, 0 validation and 0 test "
                                 "pairs fit in 8 tokens (finetune_dpo.allowed_max_length")  # fmt: skip


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"instruction": "x", "chosen": "a"}], "entry 0 needs a non-empty string 'rejected' (the rejected answer)"),
        ([{"instruction": "x", "chosen": " ", "rejected": "b"}], "entry 0 needs a non-empty string 'chosen'"),
        ([{"chosen": "a", "rejected": "b"}], "entry 0 needs a string 'instruction'"),
    ],
)
def test_bad_preference_data_is_one_line_naming_the_entry(tmp_path, entries, message):
    project = dpo_project(tmp_path / "p")
    (project / "prefs.json").write_text(json.dumps(entries))
    out = run_stage(project)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("finetune_dpo: error: finetune_dpo.data prefs.json: ") and message in out.stderr
