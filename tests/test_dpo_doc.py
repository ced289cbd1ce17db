"""docs/dpo.md's claims that no other test file checks: the loss against the margin and beta, one policy
pass per step where the notebook runs four, bf16 logits read in float32, the notebook's split, and the
book's recipe (the notebook's settings after chapter 7's GPT-2 medium run). The stage's own claims are
tested in tests/test_finetune_dpo.py, the notebook's names in tests/test_dpo.py."""

import math
import re
import shlex

import pytest
import torch

from llm.dpo import (
    DPOLoss,
    PreferenceDataset,
    cached_reference,
    collate_preferences,
    collate_with_reference,
    dpo_loss,
    response_logprobs,
    sequence_logprobs,
)
from llm.instruct import split_instructions
from llm.model import GPTModel
from llm.pipeline.params import Params
from llm.pipeline.validate import parse_yaml
from llm.tokenizer import get_tokenizer
from tests import book_reference as book
from tests.conftest import ROOT, tiny_cfg

PAIRS = [
    {"instruction": "Rewrite the sentence politely.", "input": "Give me the salt.",
     "chosen": "Could you please pass the salt?", "rejected": "Salt. Now."},
    {"instruction": "Name a primary color.", "input": "", "chosen": "Red is a primary color.", "rejected": "Red."},
    {"instruction": "Say hello.", "input": "", "chosen": "Hello, nice to meet you!", "rejected": "What?"},
]  # fmt: skip

# The notebook's settings (ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb): its collate
# (`mask_prompt_tokens=True, allowed_max_length=1024`), `batch_size = 8`, `AdamW(lr=5e-6,
# weight_decay=0.01)`, `num_epochs = 1`, `train_model_dpo_simple(beta=0.1, eval_freq=5, eval_iter=5)`
# and the answers it compares (`generate(max_new_tokens=256, eos_id=50256)`).
NOTEBOOK = {
    "lr": 5e-6, "beta": 0.1, "num_epochs": 1, "batch_size": 8, "weight_decay": 0.01,
    "allowed_max_length": 1024, "mask_prompt": True, "eval_freq": 5, "eval_iter": 5, "max_new_tokens": 256,
}  # fmt: skip


def dvc_exp_runs(page: str) -> list[dict[str, str]]:
    """The `-S key=value` settings of each `dvc exp run` command of docs/<page>."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8").replace("\\\n", " ")
    runs = []
    for line in text.splitlines():
        if line.strip().startswith("dvc exp run"):
            words = shlex.split(line, comments=True)
            runs.append(dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "-S"))
    return runs


def test_the_loss_falls_as_the_margin_grows_and_beta_scales_the_margin():
    margins = torch.linspace(-4, 4, 17)
    zero = torch.zeros_like(margins)
    for beta in (0.1, 0.5):
        terms = dpo_loss(margins, zero, zero, zero, beta=beta)  # chosen reward = margin, rejected reward = 0
        assert (terms.losses[1:] < terms.losses[:-1]).all()
        assert terms.losses[8].item() == pytest.approx(math.log(2), abs=1e-7)  # margin 0: the policy is the reference
    half = dpo_loss(2 * margins, zero, zero, zero, beta=0.05).losses  # half the beta, twice the margin
    torch.testing.assert_close(half, dpo_loss(margins, zero, zero, zero, beta=0.1).losses)


def batch_of_pairs(model):
    """A collated batch of PAIRS with the reference's (`model`'s) cached log-probabilities."""
    pairs = cached_reference(model, PreferenceDataset(PAIRS, get_tokenizer()), collate_preferences, 3, "cpu")
    return collate_with_reference([pairs[i] for i in range(len(pairs))])


def test_a_step_runs_the_policy_once_where_the_notebook_runs_four_passes():
    """The stage's loss (`DPOLoss(beta, joint=True)`, the Trainer's loss function: one call per step) runs
    the policy once on 2 x B rows and the reference never; the notebook's `compute_dpo_loss_batch` runs
    each model twice on B rows. The loss is the same."""
    torch.manual_seed(0)
    reference = GPTModel(tiny_cfg(context_length=64)).eval()
    policy = GPTModel(tiny_cfg(context_length=64)).eval()
    batch = batch_of_pairs(reference)
    calls = {"policy": [], "reference": []}
    for name, model in (("policy", policy), ("reference", reference)):
        model.register_forward_hook(lambda module, args, out, name=name: calls[name].append(args[0].shape[0]))
    ours = DPOLoss(0.1, joint=True)(policy, batch, torch.device("cpu"))[0]
    assert calls == {"policy": [2 * len(PAIRS)], "reference": []}
    calls.update(policy=[], reference=[])
    theirs = book.dpo.compute_dpo_loss_batch(batch, policy, reference, 0.1)[0]
    assert calls == {"policy": [len(PAIRS)] * 2, "reference": [len(PAIRS)] * 2}
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_bf16_logits_are_read_in_float32():
    torch.manual_seed(1)
    logits = torch.randn(2, 7, 50).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    got = response_logprobs(logits, labels, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sequence_logprobs(logits.float(), labels, mask))
    model = GPTModel(tiny_cfg(context_length=64)).eval()
    batch = batch_of_pairs(model)
    with torch.no_grad():
        fp32 = DPOLoss(0.1, joint=True).policy_logprobs(model, batch, "cpu", "fp32")
        bf16 = DPOLoss(0.1, joint=True).policy_logprobs(model, batch, "cpu", "bf16-mixed")
    for a, b in zip(fp32, bf16, strict=True):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0.02, atol=0)  # bf16's 8 bits of mantissa, not fp32's 24
        assert not torch.equal(a, b)  # autocast did run the model in bf16


def test_the_notebooks_split_of_the_1100_pairs():
    f = Params().finetune_dpo
    train, test, val = split_instructions(list(range(1100)), f.train_frac, f.test_frac)
    assert (len(train), len(test), len(val)) == (935, 110, 55) and train[-1] + 1 == test[0] and test[-1] + 1 == val[0]


def test_the_recipe_is_the_notebooks_after_the_books_chapter_7_run():
    """docs/dpo.md's recipe sets every setting of the notebook in `finetune_dpo` and, in
    `finetune_instruct`, exactly docs/gpt2.md's chapter-7 command (GPT-2 medium, 2 epochs at 5e-5)."""
    (recipe,) = dvc_exp_runs("dpo.md")
    dpo = {k.split(".", 1)[1]: v for k, v in recipe.items() if k.startswith("finetune_dpo.")}
    assert {k: parse_yaml(v) for k, v in dpo.items()} == NOTEBOOK  # values read as DVC reads them
    instruct = {k: v for k, v in recipe.items() if k.startswith("finetune_instruct.")}
    (chapter_7,) = [run for run in dvc_exp_runs("gpt2.md") if run.get("finetune_instruct.init") == "gpt2-medium"]
    assert instruct == chapter_7 and set(recipe) == set(instruct) | {f"finetune_dpo.{k}" for k in dpo}
    page = (ROOT / "docs" / "dpo.md").read_text(encoding="utf-8")
    assert re.search(r"^dvc exp run finetune_dpo ", page, re.M)  # the stage, and the stages before it


def test_every_test_the_page_names_exists_in_the_file_named_before_it():
    """docs/dpo.md names a test beside each claim, after its file: `tests/test_x.py` `test_y`."""
    page = (ROOT / "docs" / "dpo.md").read_text(encoding="utf-8")
    named = re.findall(r"tests/(test_\w+\.py)\s+`(test_\w+)`", page)
    assert len(named) >= 15
    for file, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.M), (file, name)
