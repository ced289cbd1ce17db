"""Loss helpers against the book's, the fused AdamW update, bf16 autocast, runtime helpers.

The book's training loops (`llm.book`) are tested against the book's own in test_book.py."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from llm.data import TokenWindowDataset
from llm.errors import LLMError
from llm.losses import calc_loss_batch, calc_loss_loader, perplexity
from llm.model import GPTModel
from llm.runtime import autocast, keep_freed_memory, select_device
from llm.trainer import make_optimizer
from tests import book_reference as book
from tests.conftest import tiny_cfg


@pytest.fixture
def models():
    cfg = tiny_cfg(vocab_size=97)
    torch.manual_seed(0)
    ref = book.GPTModel(cfg).eval()
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _loader(n_tokens=400, batch=3):
    ids = (np.arange(n_tokens) * 7 % 97).astype(np.uint16)
    return DataLoader(TokenWindowDataset(ids, 12, 12), batch_size=batch, shuffle=False, drop_last=False)


def test_loss_helpers_equal_the_books(models):
    ref, ours = models
    loader = _loader()
    x, y = next(iter(loader))
    assert calc_loss_batch(x, y, ours, "cpu").item() == pytest.approx(
        book.calc_loss_batch(x, y, ref, "cpu").item(), abs=1e-5
    )
    for n in (None, 1, 2, 1000):
        assert calc_loss_loader(loader, ours, "cpu", n) == pytest.approx(
            book.calc_loss_loader(loader, ref, "cpu", n), abs=1e-5
        )
    assert math.isnan(calc_loss_loader(_loader(5), ours, "cpu"))  # empty loader: NaN


def test_bf16_autocast_loss_is_close_to_fp32(models):
    _, ours = models
    x, y = next(iter(_loader()))
    fp32 = calc_loss_batch(x, y, ours, "cpu", "fp32").item()
    bf16 = calc_loss_batch(x, y, ours, "cpu", "bf16-mixed").item()
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)
    with pytest.raises(LLMError, match="unknown precision 'fp8'"):
        autocast(torch.device("cpu"), "fp8")


def test_fused_adamw_matches_the_books_adamw_update(models):
    _, ours = models
    twin = GPTModel(ours.cfg)
    twin.load_state_dict(ours.state_dict())
    x, y = next(iter(_loader()))
    fused = make_optimizer(ours, 1e-3, 0.1)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.1)
    for model, opt in ((ours, fused), (twin, plain)):
        model.train()
        for _ in range(3):
            opt.zero_grad()
            calc_loss_batch(x, y, model, "cpu").backward()
            opt.step()
    for (name, a), b in zip(ours.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_runtime_helpers():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(LLMError, match="unknown device 'tpu'"):
        select_device("tpu")
    assert keep_freed_memory() in (True, False)
    assert perplexity(0.0) == 1.0 and perplexity(1e4) == float("inf")
