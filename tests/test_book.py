"""The book's API (`llm.book`): every chapter's names, and each function against the book's own code.

The training loops run the engine's `Trainer` on the DataLoaders and optimizer they are given; with
the same seed, shuffled loaders and dropout on, they must reproduce the book's loops loss for loss.
"""

import copy
import importlib
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import llm.book
from llm.book.ch03 import SelfAttention_v2
from llm.book.ch04 import generate_text_simple
from llm.book.ch05 import train_model_simple
from llm.book.ch06 import (
    calc_accuracy_loader,
    calc_loss_batch,
    calc_loss_loader,
    classify_review,
    evaluate_model,
    train_classifier_simple,
)
from llm.data import TokenWindowDataset
from llm.model import GPTModel
from llm.tokenizer import get_tokenizer
from llm.trainer import make_optimizer
from tests import book_reference as book
from tests.conftest import ROOT, tiny_cfg

CHAPTERS = {
    "ch02": {"GPTDatasetV1", "create_dataloader_v1"},
    "ch03": {"SelfAttention_v2", "MultiHeadAttention"},
    "ch04": {
        "GPT_CONFIG_124M",
        "LayerNorm",
        "GELU",
        "FeedForward",
        "TransformerBlock",
        "GPTModel",
        "generate_text_simple",
    },
    "ch05": {
        "text_to_token_ids",
        "token_ids_to_text",
        "calc_loss_batch",
        "calc_loss_loader",
        "evaluate_model",
        "generate_and_print_sample",
        "train_model_simple",
        "generate",
    },
    "ch06": {
        "create_balanced_dataset",
        "random_split",
        "SpamDataset",
        "calc_accuracy_loader",
        "calc_loss_batch",
        "calc_loss_loader",
        "evaluate_model",
        "train_classifier_simple",
        "classify_review",
    },
    "ch07": {"format_input", "InstructionDataset", "custom_collate_fn"},
    "ch07_dpo": {
        "PreferenceDataset",
        "custom_collate_fn",
        "compute_dpo_loss",
        "compute_logprobs",
        "compute_dpo_loss_batch",
        "compute_dpo_loss_loader",
        "evaluate_dpo_loss_loader",
        "train_model_dpo_simple",
    },
    "appendix_e": {"LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"},
}
TWINS = {"calc_loss_batch", "calc_loss_loader", "evaluate_model"}  # chapters 5 and 6 differ
# custom_collate_fn: chapter 7's and the DPO notebook's differ; the package gives chapter 7's (listed first)


# --- the API ---------------------------------------------------------------------------------
@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_each_chapter_exports_exactly_the_books_names(chapter):
    module = importlib.import_module(f"llm.book.{chapter}")
    assert set(module.__all__) == CHAPTERS[chapter] and len(module.__all__) == len(CHAPTERS[chapter])
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_the_package_exports_every_unambiguous_name_and_no_twin():
    everything = set().union(*CHAPTERS.values())
    assert set(llm.book.__all__) == everything - TWINS
    for name in llm.book.__all__:
        chapter = next(c for c, names in CHAPTERS.items() if name in names)
        assert getattr(llm.book, name) is getattr(importlib.import_module(f"llm.book.{chapter}"), name), name
    for name in TWINS:
        assert not hasattr(llm.book, name), name
    assert llm.book.ch05.calc_loss_batch is not llm.book.ch06.calc_loss_batch
    assert llm.book.custom_collate_fn is llm.book.ch07.custom_collate_fn
    assert llm.book.ch07_dpo.custom_collate_fn is not llm.book.ch07.custom_collate_fn


def test_chapters_reexport_the_engine_and_the_engine_never_imports_the_book():
    import llm.classifier
    import llm.data
    import llm.dpo
    import llm.generate
    import llm.model

    assert llm.book.GPTModel is llm.model.GPTModel and llm.book.MultiHeadAttention is llm.model.MultiHeadAttention
    assert llm.book.GPTDatasetV1 is llm.data.GPTDatasetV1 and llm.book.generate is llm.generate.generate
    assert llm.book.SpamDataset is llm.classifier.SpamDataset
    assert llm.book.PreferenceDataset is llm.dpo.PreferenceDataset
    engine = [p for p in (ROOT / "llm").rglob("*.py") if "book" not in p.relative_to(ROOT / "llm").parts]
    imports_book = re.compile(r"^\s*(from llm\.book\b|import llm\.book\b|from llm import .*\bbook\b)", re.M)
    users = [p.name for p in engine if imports_book.search(p.read_text())]
    assert len(engine) > 10 and users == []


# --- chapter 3 -------------------------------------------------------------------------------
INPUTS = torch.tensor(  # the book's embeddings of "Your journey starts with one step"
    [[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
     [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]]
)  # fmt: skip


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_self_attention_v2_equals_the_books(qkv_bias):
    torch.manual_seed(789)
    ref = book.SelfAttention_v2(3, 2, qkv_bias)
    ours = SelfAttention_v2(3, 2, qkv_bias)
    ours.load_state_dict(ref.state_dict())  # strict: the book's W_query / W_key / W_value
    with torch.no_grad():
        expected = ref(INPUTS)
        assert torch.allclose(ours(INPUTS), expected, atol=1e-7, rtol=0)
        batch = torch.stack([INPUTS, INPUTS.flip(0)])  # a leading batch dimension works too
        assert torch.allclose(ours(batch)[0], expected, atol=1e-7, rtol=0)
        assert torch.allclose(ours(batch)[1], ref(INPUTS.flip(0)), atol=1e-7, rtol=0)
    if not qkv_bias:  # the book prints this for seed 789
        assert torch.allclose(expected[0], torch.tensor([-0.0739, 0.0713]), atol=1e-4)


# --- chapter 4 -------------------------------------------------------------------------------
@pytest.mark.parametrize("context_size", [24, 5])
def test_generate_text_simple_gives_the_books_tokens(context_size):
    cfg = tiny_cfg(vocab_size=97, drop_rate=0.1)
    torch.manual_seed(3)
    ref = book.GPTModel(cfg).eval()
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 97, (2, 6))
    expected = book.generate_text_simple(ref, idx, 30, context_size)  # 36 tokens: crops past 24
    got = generate_text_simple(ours, idx, 30, context_size)
    assert got.shape == (2, 36) and torch.equal(got, expected)
    assert not ours.training
    ours.train()  # called in training mode: generates in eval mode (no dropout), then puts the mode back
    assert torch.equal(generate_text_simple(ours, idx, 30, context_size), expected) and ours.training


# --- chapter 6 -------------------------------------------------------------------------------
def classifier_pair(drop_rate=0.0, seed=0, vocab_size=211):
    """The book's GPTModel and ours with the same weights and the same new 2-class head."""
    cfg = tiny_cfg(vocab_size=vocab_size, context_length=16, drop_rate=drop_rate)
    torch.manual_seed(seed)
    ref = book.GPTModel(cfg)
    ours = GPTModel(cfg)
    ours.load_state_dict(ref.state_dict())
    ref.out_head = nn.Linear(cfg["emb_dim"], 2)
    ours.out_head = copy.deepcopy(ref.out_head)
    return ref, ours


def spam_like_data(n=40, length=10, seed=0):
    """Token sequences with a learnable label: 1 when the first token is in the upper half."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 211, (n, length), generator=g)
    return TensorDataset(tokens, (tokens[:, 0] >= 105).long())


def test_chapter_6_metrics_equal_the_books():
    ref, ours = classifier_pair()
    loader = DataLoader(spam_like_data(23), batch_size=4, shuffle=False)  # a short last batch
    for n in (None, 1, 2, 100):
        acc = calc_accuracy_loader(loader, ours, "cpu", n)
        assert acc == book.ch6.calc_accuracy_loader(loader, ref, "cpu", n)
        if n is None:
            assert 0.0 < acc < 1.0  # a random head gets some right, some wrong
        assert calc_loss_loader(loader, ours, "cpu", n) == pytest.approx(
            book.ch6.calc_loss_loader(loader, ref, "cpu", n), abs=1e-6
        )
    assert not ours.training  # like the book's, calc_accuracy_loader leaves eval mode on
    x, y = next(iter(loader))
    assert calc_loss_batch(x, y, ours, "cpu").item() == pytest.approx(
        book.ch6.calc_loss_batch(x, y, ref, "cpu").item(), abs=1e-6
    )
    ours.train()
    ref.train()
    got = evaluate_model(ours, loader, loader, "cpu", 3)
    np.testing.assert_allclose(got, book.ch6.evaluate_model(ref, loader, loader, "cpu", 3), atol=1e-6)
    assert ours.training  # evaluate_model puts training mode back
    assert np.isnan(calc_loss_loader(DataLoader(spam_like_data(3), batch_size=4, drop_last=True), ours, "cpu"))


TEXTS = [
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
    "Hey, just wanted to check if we're still on for dinner tonight? Let me know!",
    "Ok lar... Joking wif u oni...",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005.",
    "Nah I don't think he goes to usf, he lives around here though",
    "URGENT! Your mobile number has been awarded a 2000 prize GUARANTEED. Call 09061790125 now",
]


def test_classify_review_equals_the_books():
    ref, ours = classifier_pair(seed=5, vocab_size=50257)  # the real GPT-2 tokenizer's ids
    tokenizer = get_tokenizer()
    answers = []
    for sign in (1.0, -1.0):  # the negated head flips every answer: both classes come out
        with torch.no_grad():
            for model in (ref, ours):
                model.out_head.weight.mul_(sign)
                model.out_head.bias.mul_(sign)
        for text in TEXTS:
            for max_length in (12, 16):  # truncates the long texts, pads the short ones
                got = classify_review(text, ours, tokenizer, "cpu", max_length=max_length)
                assert got == book.ch6.classify_review(text, ref, tokenizer, "cpu", max_length=max_length)
                answers.append(got)
            # None: the model's context length (the book's needs a number; 16 is it here)
            assert classify_review(text, ours, tokenizer, "cpu") == answers[-1]
    assert set(answers) == {"spam", "not spam"}
    flipped = {"spam": "not spam", "not spam": "spam"}
    assert answers[: len(answers) // 2] == [flipped[a] for a in answers[len(answers) // 2 :]]
    assert not ours.training


# --- the two loops, loss for loss ------------------------------------------------------------
START = "a"  # one GPT-2 id (64) inside the tiny models' vocabulary of 211


def pretraining_loaders(ids):
    """The book's chapter-5 loaders: shuffled training windows (drop_last), plain validation."""
    train = DataLoader(TokenWindowDataset(ids[:250], 12, 12), batch_size=4, shuffle=True, drop_last=True)
    val = DataLoader(TokenWindowDataset(ids[250:], 12, 12), batch_size=4, shuffle=False, drop_last=False)
    return train, val


def run_pretraining(train_fn, model, seed, **kw):
    ids = (np.arange(300) % 23 + 100).astype(np.uint16)
    torch.manual_seed(seed)  # the loaders' shuffles and dropout draw from here on
    train, val = pretraining_loaders(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return train_fn(model, train, val, opt, "cpu", 3, 2, 2, START, get_tokenizer(), **kw)


@pytest.mark.parametrize("progress", [False, True])
def test_train_model_simple_equals_the_books_loss_for_loss(progress, capsys):
    cfg = tiny_cfg(vocab_size=211, drop_rate=0.1)  # the ids are 100..122; samples decode as GPT-2 ids
    torch.manual_seed(0)
    ref = book.GPTModel(cfg)
    ours = GPTModel(cfg)
    ours.load_state_dict(ref.state_dict())
    twin = copy.deepcopy(ours)
    book_train, book_val, book_seen = run_pretraining(book.train_model_simple, ref, seed=1)
    train_losses, val_losses, seen = run_pretraining(train_model_simple, ours, seed=1, progress=progress)
    assert seen == book_seen and len(seen) == 8  # 20 windows: 5 batches an epoch, 15 steps, every 2nd
    diff = max(np.abs(np.subtract(train_losses, book_train)).max(), np.abs(np.subtract(val_losses, book_val)).max())
    assert diff < 1e-5, f"max loss difference from the book: {diff:.2e}"
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    out = capsys.readouterr()
    assert out.out.count("Ep 1 (Step 000000): Train loss") == 1 and out.out.count("Ep 3 (Step") == 3
    assert len([line for line in out.out.splitlines() if line.startswith(START)]) == 3  # a sample an epoch
    assert "\r" not in out.err
    # the comparison can fail: another seed draws other batches and dropout masks
    other, _, _ = run_pretraining(train_model_simple, twin, seed=2, progress=False)
    assert np.abs(np.subtract(other, book_train)).max() > 1e-3


def run_finetuning(train_fn, model, seed):
    torch.manual_seed(seed)
    train = DataLoader(spam_like_data(42, seed=1), batch_size=4, shuffle=True, drop_last=True)
    val = DataLoader(spam_like_data(13, seed=2), batch_size=4, shuffle=False, drop_last=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return train_fn(model, train, val, opt, "cpu", 3, 3, 2)


def test_train_classifier_simple_equals_the_books_loss_for_loss(capsys):
    ref, ours = classifier_pair(drop_rate=0.1, seed=4)
    twin = copy.deepcopy(ours)
    expected = run_finetuning(book.ch6.train_classifier_simple, ref, seed=9)
    book_out = capsys.readouterr().out
    got = run_finetuning(train_classifier_simple, ours, seed=9)
    out = capsys.readouterr().out
    (train_losses, val_losses, train_accs, val_accs, seen), (b_train, b_val, b_train_accs, b_val_accs, b_seen) = (
        got,
        expected,
    )
    assert seen == b_seen == 3 * 10 * 4 and len(train_losses) == len(b_train) == 10
    diff = max(np.abs(np.subtract(train_losses, b_train)).max(), np.abs(np.subtract(val_losses, b_val)).max())
    assert diff < 1e-5, f"max loss difference from the book: {diff:.2e}"
    assert train_accs == b_train_accs and val_accs == b_val_accs and len(val_accs) == 3
    assert out == book_out and "Training accuracy: " in out  # the book's lines, character for character
    assert not ours.training and not ref.training
    other = run_finetuning(train_classifier_simple, twin, seed=10)
    assert np.abs(np.subtract(other[0], b_train)).max() > 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_train_model_simple_learns_with_the_fused_optimizer_and_bf16(precision, capsys):
    torch.manual_seed(1)
    model = GPTModel(tiny_cfg(vocab_size=211, drop_rate=0.1))
    ids = (np.arange(600) % 23 + 100).astype(np.uint16)  # a repeating pattern to memorise
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TokenWindowDataset(ids[:500], 12, 12), 4, shuffle=True, drop_last=True, generator=g)
    val = DataLoader(TokenWindowDataset(ids[500:], 12, 12), 4)
    opt = make_optimizer(model, lr=3e-3, weight_decay=0.1)
    train_losses, val_losses, seen = train_model_simple(
        model, train, val, opt, "cpu", 6, 5, 2, START, get_tokenizer(), precision=precision, progress=False
    )
    assert len(train_losses) == len(val_losses) == len(seen) > 2
    assert seen == sorted(seen) and seen[0] == 4 * 12
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert "Ep 1 (Step 000000)" in capsys.readouterr().out
    assert opt.param_groups[0]["lr"] == 3e-3  # the loop leaves a given optimizer's lr alone
