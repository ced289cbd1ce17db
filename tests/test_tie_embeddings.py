"""`model.tie_embeddings` (docs/training.md, Tied embeddings): off, the book's model bit for bit; on, one
[vocab, emb] matrix that embeds the tokens and computes the logits, as GPT-2's. Through every place a model
goes: training (the gradient of both uses, a resume bit for bit in tests/test_resume.py), checkpoints
(written once, re-tied on read), a classifier's new head and LoRA's merge (both untie), GPT-2 export and
`model.init` from weights, the pretrain stage on one and two processes, `llm generate`, `llm serve`, and
the instruction and preference stages, which keep a tied model tied."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llm.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    export_hf,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_adapter,
    save_checkpoint,
    weights_sha256,
)
from llm.classifier import add_classification_head, load_classifier, save_classifier
from llm.config import config_for_weights, estimate_params
from llm.errors import CheckpointError, ConfigError
from llm.lora import adapter_state_dict, apply_lora, lora_layers, merge_lora
from llm.model import GPTModel, flops_per_token, model_config
from tests import book_reference as book
from tests.conftest import tiny_cfg

CFG = tiny_cfg(vocab_size=97, context_length=16)
TIED = {**CFG, "tie_embeddings": True}
IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))


def built(cfg, seed=0):
    torch.manual_seed(seed)
    return GPTModel(cfg)


def perturbed(model, seed=1):
    """Weights away from their init (a trained model), the tie kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


# --- the model --------------------------------------------------------------------------------------------
def test_off_by_default_and_then_the_books_model_bit_for_bit():
    assert model_config(tiny_cfg())["tie_embeddings"] is False  # a config without the key: the book's
    ours, theirs = built(CFG), None
    torch.manual_seed(0)
    theirs = book.GPTModel(CFG)
    assert not ours.tied and ours.out_head.weight is not ours.tok_emb.weight
    ref = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, ref[key]), key


def test_a_tied_model_holds_one_matrix_drawn_as_the_untied_ones_head():
    tied, untied = built(TIED), built(CFG)
    assert tied.tied and tied.out_head.weight is tied.tok_emb.weight
    assert torch.equal(tied.out_head.weight, untied.out_head.weight)  # the head's init, the same RNG draws
    untied_state = untied.state_dict()
    for key, value in tied.state_dict().items():
        if key != "tok_emb.weight":
            assert torch.equal(value, untied_state[key]), key
    v, d = CFG["vocab_size"], CFG["emb_dim"]
    assert tied.num_params() == untied.num_params() - v * d == estimate_params(TIED)
    assert estimate_params(CFG) == untied.num_params()
    # the head still multiplies by the matrix: the same matmul weights and FLOPs as untied
    assert tied.num_params(matmul_only=True) == untied.num_params(matmul_only=True)
    assert flops_per_token(tied, 16) == flops_per_token(untied, 16)
    # the head's init: the first loss near ln(vocab), as untied; the embedding's N(0, 1) would give logits
    # about sqrt(emb_dim) times larger. The token embeddings start smaller than the positions' N(0, 1).
    targets = IDS[:, 1:].flatten()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(m.eval()(IDS[:, :-1]).flatten(0, 1), targets).item()
                  for m in (tied, untied)]  # fmt: skip
        untied.out_head.weight.copy_(untied.tok_emb.weight)
        normal = torch.nn.functional.cross_entropy(untied(IDS[:, :-1]).flatten(0, 1), targets).item()
    assert all(abs(loss - math.log(v)) < 1 for loss in losses) and normal > math.log(v) + 3
    assert tied.tok_emb.weight.std() < 0.2 < 0.9 < tied.pos_emb.weight.std()  # 1/sqrt(3 * 36) against 1


def test_the_gradient_of_both_uses_reaches_the_one_matrix_and_a_step_keeps_the_tie():
    tied = built(TIED)
    untied = built(CFG)
    with torch.no_grad():  # the untied twin: its embedding a copy of the same matrix
        untied.tok_emb.weight.copy_(untied.out_head.weight)
    for m in (tied, untied):
        m.train()
        torch.nn.functional.cross_entropy(m(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten()).backward()
    both = untied.tok_emb.weight.grad + untied.out_head.weight.grad
    torch.testing.assert_close(tied.tok_emb.weight.grad, both, rtol=1e-5, atol=1e-7)
    assert untied.tok_emb.weight.grad.abs().sum() > 0 and untied.out_head.weight.grad.abs().sum() > 0
    before = tied.tok_emb.weight.detach().clone()
    torch.optim.AdamW(tied.parameters(), lr=1e-2).step()
    assert tied.tied and not torch.equal(tied.tok_emb.weight, before)


# --- checkpoints ------------------------------------------------------------------------------------------
def test_a_tied_checkpoint_holds_the_matrix_once_and_loads_tied_with_equal_logits(tmp_path):
    model = perturbed(built(TIED))
    path = save_checkpoint(model, tmp_path / "tied")
    assert "out_head.weight" not in load_file(path / WEIGHTS_NAME)
    assert json.loads((path / CONFIG_NAME).read_text())["model"]["tie_embeddings"] is True
    loaded = load_checkpoint(path)
    assert loaded.tied
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))  # bit for bit
    # reading gives the book's layout (both names), so the hash is the model's own
    assert weights_sha256(read_checkpoint(path).state) == weights_sha256(model.state_dict())


def test_a_checkpoint_without_the_key_loads_untied_and_a_tied_model_refuses_a_different_head(tmp_path):
    model = perturbed(built(CFG))
    path = save_checkpoint(model, tmp_path / "old")
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert "tie_embeddings" not in meta["model"]  # the book's seven keys, as a checkpoint written before the switch
    assert list(meta["model"]) == list(tiny_cfg())
    assert not load_checkpoint(path).tied
    with pytest.raises(CheckpointError, match="out_head.weight differs from tok_emb.weight") as err:
        load_weights(built(TIED), model.state_dict(), "old")
    assert "\n" not in str(err.value)


def test_a_classifiers_new_head_unties_and_its_checkpoint_says_so(tmp_path):
    torch.manual_seed(2)
    model = add_classification_head(built(TIED), 2)
    assert not model.tied and model.cfg["tie_embeddings"] is False
    path = save_classifier(model, tmp_path / "spam", max_length=8, pooling="mean")
    assert "tie_embeddings" not in json.loads((path / CONFIG_NAME).read_text())["model"]  # the book's keys
    loaded, _ = load_classifier(path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model.eval()(IDS))


def test_lora_on_a_tied_model_trains_and_merging_the_head_unties_it(tmp_path):
    """The frozen shared matrix stays the embedding; the head's adapter, merged, changes the head alone."""
    base_dir = save_checkpoint(perturbed(built(TIED)), tmp_path / "base")
    start = read_checkpoint(base_dir)
    model = apply_lora(start.model(), rank=2, alpha=4.0, targets=["attention", "head"])
    assert model.tied and not model.tok_emb.weight.requires_grad
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten()).backward()
        opt.step()
    assert model.out_head.lora.B.abs().sum() > 0
    model.eval()
    embedding = model.tok_emb.weight.detach().clone()
    with torch.no_grad():
        expected = model(IDS)
    lora = {"rank": 2, "alpha": 4.0, "targets": ["attention", "head"]}
    adapter = save_adapter(adapter_state_dict(model), tmp_path / "adapter", lora=lora, base=str(base_dir),
                           base_sha256=weights_sha256(start.state), base_config=start.cfg)  # fmt: skip
    merge_lora(model)
    assert not lora_layers(model) and not model.tied and model.cfg["tie_embeddings"] is False
    assert torch.equal(model.tok_emb.weight, embedding)  # the embedding did not take the head's update
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-5)
    merged = load_checkpoint(save_checkpoint(model, tmp_path / "merged"))
    from_adapter = load_checkpoint(adapter)  # the adapter checkpoint merges into an untied model too
    assert not merged.tied and not from_adapter.tied
    with torch.no_grad():
        assert torch.equal(merged(IDS), model(IDS))
        torch.testing.assert_close(from_adapter(IDS), expected, rtol=0, atol=1e-5)


# --- GPT-2 and model.init from weights ----------------------------------------------------------------------
def initial(init, tie, max_length=8):
    """stages.pretrain.initial_model with these settings."""
    from llm.pipeline.params import ModelParams
    from stages.pretrain import initial_model

    params = SimpleNamespace(
        model=ModelParams(init=str(init), tie_embeddings=tie), train=SimpleNamespace(seed=1, max_length=max_length)
    )
    return initial_model(params)


def test_a_tied_model_exports_as_gpt2_does_and_trains_on_tied_from_the_export(tmp_path, capsys):
    model = perturbed(built(TIED))
    out = export_hf(model, tmp_path / "hf")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    back = load_checkpoint(out)  # GPT-2's layout reads as the book reads it: a head of its own, equal
    with torch.no_grad():
        assert torch.equal(back(IDS), model(IDS))
    again, cfg = initial(out, tie=True)
    assert again.tied and cfg["tie_embeddings"] is True
    assert "head equals its token embedding" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(again.eval()(IDS), model(IDS))
    untied, cfg = initial(out, tie=False)  # the book: GPT-2's wte copied into out_head
    assert not untied.tied and cfg["tie_embeddings"] is False
    assert "trains on as a copy of its own" in capsys.readouterr().out


def test_tying_weights_whose_head_differs_from_their_embedding_is_one_line_naming_the_key(tmp_path):
    path = save_checkpoint(perturbed(built(CFG)), tmp_path / "untied")
    with pytest.raises(ConfigError, match="model.tie_embeddings = true, but .*out_head differs") as err:
        initial(path, tie=True)
    assert "\n" not in str(err.value)
    tied = save_checkpoint(perturbed(built(TIED)), tmp_path / "tied")
    cfg, notes = config_for_weights(load_checkpoint(tied).cfg, {"tie_embeddings": False}, "tied")
    assert cfg["tie_embeddings"] is False and any("copy of its own" in n for n in notes)


# --- the stages, `llm generate` and `llm serve` -------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_pretrain(tmp_path_factory):
    """The pretrain stage with model.tie_embeddings true on two processes (DDP), and on one at twice the batch."""
    from tests.test_distributed import run_stage, stage_project

    runs = {}
    for nproc, batch in ((2, 2), (1, 4)):
        project = stage_project(tmp_path_factory.mktemp(f"tied{nproc}"), nproc_per_node=nproc, batch_size=batch)
        raw = json.loads((project / "params.yaml").read_text())
        raw["model"].update(tie_embeddings=True, vocab_size=None)  # GPT-2's vocabulary: `llm generate` prompts
        (project / "params.yaml").write_text(json.dumps(raw))
        out = run_stage(project)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[nproc] = project
    return runs


def test_the_pretrain_stage_trains_a_tied_model_on_two_processes_as_on_one(tied_pretrain):
    models = {n: tied_pretrain[n] / "models" / "pretrain" for n in tied_pretrain}
    for path in models.values():
        assert json.loads((path / CONFIG_NAME).read_text())["model"]["tie_embeddings"] is True
        assert "out_head.weight" not in load_file(path / WEIGHTS_NAME)
    two, one = (load_checkpoint(models[n]) for n in (2, 1))
    assert two.tied and one.tied
    for key, value in one.state_dict().items():  # tests/test_distributed.py's tolerance for DDP vs one process
        torch.testing.assert_close(two.state_dict()[key], value, rtol=0, atol=1e-4)


def test_llm_generate_and_llm_serve_read_a_tied_checkpoint(tied_pretrain, capsys):
    from fastapi.testclient import TestClient

    from llm.cli import main
    from llm.serve.app import create_app
    from llm.serve.registry import load_models
    from tests.test_serve import _greedy

    path = tied_pretrain[1] / "models" / "pretrain"
    model = load_checkpoint(path)
    assert main(["generate", "--model", str(path), "--prompt", "Every", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == "Every" + _greedy(model, "Every", 5) + "\n"
    with TestClient(create_app(load_models([f"tied={path}"]))) as client:
        body = {"model": "tied", "prompt": "Every", "max_tokens": 5, "temperature": 0}
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == _greedy(model, "Every", 5)


def finetuning_project(folder, **lora):
    """tests/test_distributed.py's finetuning project, its 'pretrained' model tied (DPO starts from it too)."""
    from tests.test_distributed import finetune_project

    project = finetune_project(folder, nproc=1, batch_size=4)
    torch.manual_seed(0)
    cfg = tiny_cfg(context_length=64, emb_dim=16, n_heads=2, n_layers=1, tie_embeddings=True)
    save_checkpoint(GPTModel(cfg), project / "models" / "pretrain")
    raw = json.loads((project / "params.yaml").read_text())
    raw["finetune_instruct"]["lora"].update(lora)
    (project / "params.yaml").write_text(json.dumps(raw))
    return project


@pytest.mark.parametrize(
    "stage, lora", [("finetune_instruct", False), ("finetune_dpo", False), ("finetune_instruct", True)],
    ids=["instruct", "dpo", "instruct-lora"],
)  # fmt: skip
def test_finetuning_keeps_a_tied_model_tied_and_lora_on_its_head_unties_it(tmp_path, stage, lora):
    from tests.test_distributed import run_module

    settings = {"rank": 2, "alpha": 4.0, "targets": ["attention", "head"]} if lora else {}
    project = finetuning_project(tmp_path / "p", **settings)
    out = run_module(f"stages.{stage}", project)
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = project / "models" / stage.removeprefix("finetune_")
    model = load_checkpoint(model_dir)
    assert model.tied is not lora
    assert json.loads((model_dir / CONFIG_NAME).read_text())["model"].get("tie_embeddings", False) is not lora
    pretrained = load_checkpoint(project / "models" / "pretrain")
    if lora:  # the merged head moved, the frozen embedding did not; the adapter reads back to the same model
        assert torch.equal(model.tok_emb.weight, pretrained.tok_emb.weight)
        assert not torch.equal(model.out_head.weight, pretrained.out_head.weight)
        with torch.no_grad():
            torch.testing.assert_close(load_checkpoint(model_dir / "adapter")(IDS), model(IDS), rtol=0, atol=1e-5)
    else:
        assert not torch.equal(model.tok_emb.weight, pretrained.tok_emb.weight)  # trained, as one matrix
