"""DPO, the book's chapter-7 bonus (`llm.dpo`, `llm.book.ch07_dpo`) against the notebook's own code
(`tests/book_reference.py`, `book.dpo`): the dataset on the real preference data, the collate
function, the log-probabilities, the loss and rewards, a batch, a loader, and the training loop
step for step.

Where both sides run the same model object the floats must be identical (the same torch ops in the
same order, dropout drawn in the same order); the book's GPTModel against ours agrees to 1e-6.
"""

import copy
import json
import math
import re

import pytest
import torch
from torch.utils.data import DataLoader

from llm.book.ch07_dpo import (
    PreferenceDataset,
    compute_dpo_loss,
    compute_dpo_loss_batch,
    compute_dpo_loss_loader,
    compute_logprobs,
    custom_collate_fn,
    evaluate_dpo_loss_loader,
    train_model_dpo_simple,
)
from llm.dpo import dpo_loss, pair_logprobs
from llm.model import GPTModel
from llm.prompts import format_input
from llm.tokenizer import get_tokenizer
from tests import book_reference as book
from tests.conftest import tiny_cfg


@pytest.fixture(scope="module")
def data(public_input):
    return json.loads(public_input("preferences").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dataset(data):
    return PreferenceDataset(data, get_tokenizer())


# --- the data --------------------------------------------------------------------------------
def test_the_data_is_chapter_7s_instructions_with_two_answers(data):
    assert len(data) == 1100
    assert all({"instruction", "input", "chosen", "rejected"} <= set(entry) for entry in data)
    assert sum(entry["chosen"] != entry["rejected"] for entry in data) > 1000


def test_dataset_items_equal_the_notebooks_on_the_whole_file(data, dataset):
    tokenizer = get_tokenizer()
    expected = book.dpo.PreferenceDataset(data, tokenizer)
    assert len(dataset) == len(expected) == 1100
    assert [dataset[i] for i in range(len(dataset))] == [expected[i] for i in range(len(expected))]
    entry, item = data[50], dataset[50]
    assert tokenizer.decode(item["prompt"]) == format_input(entry) == book.dpo.format_input(entry)
    assert tokenizer.decode(item["chosen"]) == f"{format_input(entry)}\n\n### Response:\n{entry['chosen']}"
    assert tokenizer.decode(item["rejected"]) == f"{format_input(entry)}\n\n### Response:\n{entry['rejected']}"


def test_an_endoftext_inside_a_text_is_plain_text():
    entry = {"instruction": "Say <|endoftext|>.", "input": "", "chosen": "a", "rejected": "b"}
    tokenizer = get_tokenizer()
    item = PreferenceDataset([entry], tokenizer)[0]
    assert tokenizer.eot_token not in item["chosen"] and "<|endoftext|>" in tokenizer.decode(item["prompt"])
    with pytest.raises(ValueError):  # the notebook's tokenizer.encode refuses it
        book.dpo.PreferenceDataset([entry], tokenizer)


# --- the collate function --------------------------------------------------------------------
BATCHES = [[0, 1], [2, 9, 5, 7, 1], [683], [128, 552, 555]]  # 683 and 552: the file's longest pairs


@pytest.mark.parametrize("mask_prompt_tokens", [True, False])
@pytest.mark.parametrize("allowed_max_length", [None, 1024, 70, 40, 20])  # 20 cuts into every prompt
def test_collate_equals_the_notebooks(dataset, allowed_max_length, mask_prompt_tokens):
    for rows in BATCHES:
        batch = [dataset[i] for i in rows]
        kw = {"allowed_max_length": allowed_max_length, "mask_prompt_tokens": mask_prompt_tokens}
        got, expected = custom_collate_fn(batch, **kw), book.dpo.custom_collate_fn(batch, **kw)
        assert list(got) == list(expected) == ["prompt", "chosen", "rejected", "rejected_mask", "chosen_mask"]
        for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
        assert len(got["prompt"]) == len(rows)
        assert all(torch.equal(a, b) for a, b in zip(got["prompt"], expected["prompt"], strict=True))
        longest = max(len(dataset[i][key]) for i in rows for key in ("chosen", "rejected"))
        assert got["chosen"].shape == got["rejected"].shape == (len(rows), min(longest + 1, allowed_max_length or 9999))


def test_the_masks_select_the_response_after_the_prompt_and_two_newlines(data, dataset):
    tokenizer = get_tokenizer()
    rows = [2, 9, 5]
    batch = custom_collate_fn([dataset[i] for i in rows])
    for row, i in enumerate(rows):
        for key in ("chosen", "rejected"):
            selected = batch[key][row][batch[f"{key}_mask"][row]]
            assert tokenizer.decode(selected.tolist()) == f"### Response:\n{data[i][key]}"
    unmasked = custom_collate_fn([dataset[i] for i in rows], mask_prompt_tokens=False)
    for row, i in enumerate(rows):  # only the padding is left out
        assert unmasked["chosen_mask"][row].sum() == len(dataset[i]["chosen"])
        assert tokenizer.decode(unmasked["chosen"][row][unmasked["chosen_mask"][row]].tolist()).startswith("Below is")
    assert (batch["chosen"][:, -1] == 50256).all()  # every row ends in a pad
    moved = custom_collate_fn([dataset[i] for i in rows], device="meta")  # the tensors move, the prompts stay
    assert {moved[key].device.type for key in ("chosen", "rejected", "chosen_mask", "rejected_mask")} == {"meta"}
    assert {p.device.type for p in moved["prompt"]} == {"cpu"}


# --- log-probabilities and the loss ----------------------------------------------------------
def test_compute_logprobs_equals_the_notebooks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.4
    mask[:, 1] = True  # every row selects a token
    for selection_mask in (None, mask):
        got = compute_logprobs(logits, labels, selection_mask)
        assert got.shape == (3,) and torch.equal(got, book.dpo.compute_logprobs(logits, labels, selection_mask))
    # by hand: position t scores token t + 1, averaged over the selected positions
    log_probs = torch.log_softmax(logits, dim=-1)
    by_hand = [
        sum(log_probs[b, t, labels[b, t + 1]] for t in range(6) if mask[b, t + 1]) / mask[b, 1:].sum() for b in range(3)
    ]
    assert torch.allclose(compute_logprobs(logits, labels, mask), torch.stack(by_hand), atol=1e-6)
    first_flipped = mask.clone()
    first_flipped[:, 0] = ~first_flipped[:, 0]  # the first token is never scored
    assert torch.equal(compute_logprobs(logits, labels, first_flipped), compute_logprobs(logits, labels, mask))
    none = torch.zeros_like(mask)
    assert torch.isnan(compute_logprobs(logits, labels, none)).all()
    assert torch.isnan(book.dpo.compute_logprobs(logits, labels, none)).all()


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_compute_dpo_loss_equals_the_notebooks(beta):
    g = torch.Generator().manual_seed(1)
    inputs = [-torch.rand(5, generator=g) * 3 for _ in range(4)]
    ours = [t.clone().requires_grad_() for t in inputs]
    theirs = [t.clone().requires_grad_() for t in inputs]
    got, expected = compute_dpo_loss(*ours, beta=beta), book.dpo.compute_dpo_loss(*theirs, beta=beta)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert got[0].requires_grad and not got[1].requires_grad and not got[2].requires_grad
    got[0].backward()
    expected[0].backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True))
    terms = dpo_loss(*inputs, beta=beta)  # the library's: per pair
    assert terms.losses.shape == terms.chosen_rewards.shape == (5,)
    assert torch.equal(terms.losses.mean(), got[0].detach())
    assert torch.equal(terms.chosen_rewards, inputs[0] - inputs[2])  # policy - reference, not scaled by beta
    same = dpo_loss(inputs[0], inputs[1], inputs[0], inputs[1], beta=beta)  # policy == reference
    assert torch.allclose(same.losses, torch.full((5,), math.log(2))) and not same.chosen_rewards.any()


# --- a batch, a loader, the loop -------------------------------------------------------------
# The models here are tiny, and so is their vocabulary: the real pairs' token ids modulo VOCAB
# (the same lengths and prompt masks), padded with VOCAB - 1. A 50257-token output layer would
# make every step a hundred times slower.
VOCAB = 211


@pytest.fixture(scope="module")
def small(dataset):
    return [{key: [t % VOCAB for t in ids] for key, ids in dataset[i].items()} for i in range(30)]


def collate(batch):
    return custom_collate_fn(batch, pad_token_id=VOCAB - 1)


def models(seed=0, drop_rate=0.1, cls=GPTModel, vocab_size=VOCAB):
    """A reference model (eval mode) and a policy that has drifted from it (training mode)."""
    torch.manual_seed(seed)
    reference = cls(tiny_cfg(vocab_size=vocab_size, context_length=128, drop_rate=drop_rate))
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.train(), reference.eval()


def loader(items, rows, batch_size=3, shuffle=False, **kw):
    return DataLoader([items[i] for i in rows], batch_size=batch_size, shuffle=shuffle, collate_fn=collate, **kw)


def test_a_batch_equals_the_notebooks_with_the_same_dropout(small):
    policy, reference = models()
    batch = collate(small[:3])
    torch.manual_seed(5)
    got = compute_dpo_loss_batch(batch, policy, reference, 0.1)
    torch.manual_seed(5)
    expected = book.dpo.compute_dpo_loss_batch(batch, policy, reference, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert got[0].item() != pytest.approx(math.log(2), abs=1e-3) and got[1] != got[2]  # the models differ
    torch.manual_seed(6)  # other dropout masks, another loss: the draws are what is compared
    assert compute_dpo_loss_batch(batch, policy, reference, 0.1)[0] != got[0]
    chosen, rejected = pair_logprobs(reference, batch)
    assert torch.equal(chosen, compute_logprobs(reference(batch["chosen"]), batch["chosen"], batch["chosen_mask"]))
    assert chosen.shape == rejected.shape == (3,) and (chosen < 0).all()


def test_the_books_model_gives_the_same_batch_loss_to_1e_6(dataset):
    ours_policy, ours_reference = models(drop_rate=0.0, vocab_size=50257)  # the real token ids
    book_policy, book_reference = models(drop_rate=0.0, cls=book.GPTModel, vocab_size=50257)
    book_policy.load_state_dict(ours_policy.state_dict())
    book_reference.load_state_dict(ours_reference.state_dict())
    batch = custom_collate_fn([dataset[i] for i in (3, 4, 5, 6)])
    got = compute_dpo_loss_batch(batch, ours_policy, ours_reference, 0.1)
    expected = book.dpo.compute_dpo_loss_batch(batch, book_policy, book_reference, 0.1)
    for a, b in zip(got, expected, strict=True):
        assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_loaders_and_evaluation_equal_the_notebooks(small):
    policy, reference = models()
    policy.eval()
    train, val = loader(small, range(10)), loader(small, range(10, 17), batch_size=2)  # short last batches
    for num_batches in (None, 1, 2, 100):
        got = compute_dpo_loss_loader(train, policy, reference, 0.1, num_batches)
        assert got == book.dpo.compute_dpo_loss_loader(train, policy, reference, 0.1, num_batches)
    assert compute_dpo_loss_loader(train, policy, reference, 0.1, 1) != compute_dpo_loss_loader(
        train, policy, reference, 0.1
    )
    policy.train()
    got = evaluate_dpo_loss_loader(policy, reference, train, val, 0.1, 2)
    assert got == book.dpo.evaluate_dpo_loss_loader(policy, reference, train, val, 0.1, 2)
    assert list(got) == [
        "train_loss",
        "train_chosen_reward",
        "train_rejected_reward",
        "val_loss",
        "val_chosen_reward",
        "val_rejected_reward",
    ]
    assert policy.training  # evaluated in eval mode (no dropout: equal to the eval-mode loader below), left training
    policy.eval()
    assert got["train_loss"] == compute_dpo_loss_loader(train, policy, reference, 0.1, 2)[0]


def test_an_empty_loader_gives_three_nans_where_the_notebook_gives_one(small):
    policy, reference = models()
    empty = loader(small, range(2), batch_size=3, drop_last=True)
    got = compute_dpo_loss_loader(empty, policy, reference, 0.1)
    assert len(got) == 3 and all(math.isnan(x) for x in got)
    assert math.isnan(book.dpo.compute_dpo_loss_loader(empty, policy, reference, 0.1))
    res = evaluate_dpo_loss_loader(policy, reference, loader(small, range(3)), empty, 0.1, 1)
    assert math.isnan(res["val_loss"]) and not math.isnan(res["train_loss"])


START = "a"  # one GPT-2 id (64) inside the tiny vocabulary


def run_dpo(train_fn, policy, reference, items, seed):
    torch.manual_seed(seed)  # the training loader's shuffles and dropout draw from here on
    train = loader(items, range(16), batch_size=4, shuffle=True, drop_last=True)  # 4 steps an epoch
    val = loader(items, range(16, 22), batch_size=4)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    return train_fn(policy, reference, train, val, optimizer, 2, 0.1, 3, 2, START, get_tokenizer())


def test_train_model_dpo_simple_equals_the_notebooks_step_for_step(small, capsys):
    policy, reference = models()
    twin, other = copy.deepcopy(policy), copy.deepcopy(policy)
    expected = run_dpo(book.dpo.train_model_dpo_simple, twin, reference, small, seed=3)
    book_out = capsys.readouterr().out
    got = run_dpo(train_model_dpo_simple, policy, reference, small, seed=3)
    out = capsys.readouterr().out
    assert list(got) == list(expected) and got == expected  # identical floats, every tracked list
    assert got["tokens_seen"][0] > 0 and len(got["train_losses"]) == 3  # 8 steps, evaluated at 0, 3 and 6
    for (name, a), b in zip(policy.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
    ep_lines = [line for line in out.splitlines() if line.startswith("Ep ")]
    assert ep_lines == book_out.splitlines() and ep_lines[0].startswith("Ep 1 (Step 000000): Train loss ")
    assert re.search(r"Val reward margins -?\d+\.\d{3}$", ep_lines[-1])
    assert len([line for line in out.splitlines() if line.startswith(START)]) == 2  # a sample an epoch
    margins = [c - r for c, r in zip(got["train_chosen_rewards"], got["train_rejected_rewards"], strict=True)]
    assert got["train_losses"][-1] < got["train_losses"][0] and margins[-1] > margins[0]  # it learns the preference
    # the comparison can fail: another seed draws other batches and dropout masks
    assert run_dpo(train_model_dpo_simple, other, reference, small, seed=4)["train_losses"] != expected["train_losses"]
