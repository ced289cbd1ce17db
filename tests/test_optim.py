"""`train.optimizer`: the book's AdamW, or Muon for the transformer blocks' matrices beside AdamW for the rest
(llm/optim.py): which weight goes where, one lr for both, the resume state, the Trainer, params."""

import pytest
import torch

from llm.errors import ConfigError
from llm.lora import apply_lora
from llm.model import GPTModel
from llm.optim import Optimizers, make_optimizer, muon_params
from llm.trainer import Trainer
from tests.conftest import tiny_cfg
from tests.test_resume import assert_same, count_steps, datasets, make_trainer, outcome, settings, starting_model

CFG = tiny_cfg(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)


def names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_adamw_is_the_books_optimizer_over_every_trainable_weight():
    model = GPTModel(CFG)
    opt = make_optimizer(model, 1e-3, 0.1)
    assert type(opt) is torch.optim.AdamW
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPTModel(CFG)
    opt = make_optimizer(model, 1e-3, 0.1, "muon")
    muon, adamw = opt.optimizers
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    matrices = names(model, [p for g in muon.param_groups for p in g["params"]])
    rest = names(model, [p for g in adamw.param_groups for p in g["params"]])
    assert matrices and all(n.startswith("trf_blocks.") and n.endswith(".weight") for n in matrices)
    assert {"tok_emb.weight", "pos_emb.weight", "out_head.weight", "final_norm.scale"} <= set(rest)
    assert not any(n.startswith("trf_blocks.") and "norm" not in n and n.endswith(".weight") for n in rest)
    assert sorted(matrices + rest) == sorted(n for n, _ in model.named_parameters())  # each weight once
    assert all(g["adjust_lr_fn"] == "match_rms_adamw" for g in muon.param_groups)  # one lr for both


def test_muon_with_lora_trains_the_adapters_only():
    model = GPTModel(CFG)
    apply_lora(model, rank=2, alpha=4.0, targets=["attention", "feed_forward", "head"])
    matrices, rest = muon_params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(names(model, matrices)) | set(names(model, rest)) == trainable
    assert all(".A" in n or ".B" in n or "lora" in n.lower() for n in names(model, matrices))


def test_an_lr_written_into_param_groups_reaches_both_optimizers():
    opt = make_optimizer(GPTModel(CFG), 1e-3, 0.1, "muon")
    for group in opt.param_groups:
        group["lr"] = 0.5
    assert [g["lr"] for o in opt.optimizers for g in o.param_groups] == [0.5, 0.5]


def test_a_muon_step_moves_the_blocks_and_the_embeddings():
    torch.manual_seed(0)
    model = GPTModel(CFG)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, 1e-2, 0.0, "muon")
    x = torch.randint(0, CFG["vocab_size"], (2, 8))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "trf_blocks.0.att.W_query.weight" in moved and "out_head.weight" in moved and "tok_emb.weight" in moved


def test_a_state_of_another_optimizer_is_one_line():
    opt = make_optimizer(GPTModel(CFG), 1e-3, 0.1, "muon")
    adamw_state = make_optimizer(GPTModel(CFG), 1e-3, 0.1).state_dict()
    with pytest.raises(ConfigError, match="saved with another train.optimizer"):
        opt.load_state_dict(adamw_state)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'; allowed: adamw, muon"):
        make_optimizer(GPTModel(CFG), 1e-3, 0.1, "sgd")


def test_muon_trains_a_model_down():
    """A tiny model on repeated data: Muon's run ends far below where it starts."""
    s = settings(optimizer="muon", lr=2e-2, num_epochs=6, eval_freq=5, grad_clip=0.0, warmup_steps=0)
    trainer = make_trainer(s, data=datasets())
    assert isinstance(trainer.optimizer, Optimizers)
    history = trainer.fit()
    assert history.train_loss[-1] < history.train_loss[0] - 0.5


@pytest.mark.parametrize("k", [2, 7])
def test_muon_resumes_bit_for_bit(tmp_path, k):
    """Stopped after step k and rerun: the weights, History and RNG of an uninterrupted Muon run (both
    optimizers' states are in the resume state)."""
    s = settings(optimizer="muon")
    full = make_trainer(s)
    expected = outcome(full.model, full.fit(), torch.get_rng_state())
    state = tmp_path / "state.pt"
    first = make_trainer(s, state)
    count_steps(first, at=k, action="stop")
    with pytest.raises(Exception, match=f"interrupted at step {k}"):
        first.fit()
    model = starting_model()
    torch.manual_seed(999)
    second = make_trainer(s, state, model=model)
    history = second.fit()
    assert_same(outcome(model, history, torch.get_rng_state()), expected)


def test_trainer_default_is_adamw():
    train, val = datasets()
    from llm.loaders import make_loaders

    s = settings()
    trainer = Trainer(starting_model(), make_loaders(train, val, s), s, progress=False, log=lambda m: None)
    assert type(trainer.optimizer) is torch.optim.AdamW
