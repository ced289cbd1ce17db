"""What the code does for a CUDA device, checked on a machine without one: TF32 matmuls, pinned-memory
loaders, copies that do not wait, fused AdamW. Nothing here runs on a GPU (docs/performance.md, GPU)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llm import loaders, runtime, trainer
from llm.classifier import classification_loss
from llm.data import TokenWindowDataset
from llm.losses import calc_loss_batch
from llm.model import GPTModel
from llm.settings import LoopSettings
from llm.trainer import Trainer, make_optimizer
from tests.conftest import tiny_cfg

CFG = tiny_cfg(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1)


@pytest.fixture
def precision_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    return calls


def test_a_cuda_device_turns_on_tf32_matmuls_and_cpu_does_not(monkeypatch, precision_calls):
    assert runtime.select_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.select_device("auto").type in ("cpu", "mps")
    assert precision_calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.select_device("cuda") == torch.device("cuda")
    assert runtime.select_device("cuda:1") == torch.device("cuda", 1)
    assert runtime.select_device("auto") == torch.device("cuda")
    assert precision_calls == ["high"] * 3


def test_the_per_backend_tf32_setting_alone_breaks_the_process_wide_getter():
    """Why `use_tf32` goes through `torch.set_float32_matmul_precision`."""
    assert torch.get_float32_matmul_precision() == "highest"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
            torch.get_float32_matmul_precision()
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest"


class Recorder:
    """Stands in for `Tensor.to`: records the call; to CUDA it returns the tensor itself, on the CPU."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            device = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else None
            if device is not None:
                self.calls.append((device.type, kwargs.get("non_blocking", False)))
                if device.type == "cuda":
                    return tensor
            return real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)


def test_the_training_losses_copy_batches_to_cuda_without_waiting(monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(CFG)
    x, y = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    labels = torch.tensor([0, 1])
    rec = Recorder(monkeypatch)
    calc_loss_batch(x, y, model, "cuda")
    classification_loss("mean")(model, (x, labels), torch.device("cuda"), "fp32")
    assert rec.calls == [("cuda", True)] * 4
    rec.calls.clear()
    calc_loss_batch(x, y, model, "cpu")
    classification_loss("mean")(model, (x, labels), torch.device("cpu"), "fp32")
    assert rec.calls == [("cpu", False)] * 4


def _trainer(monkeypatch, device: str) -> Trainer:
    """A Trainer built for `device`, the model left on the CPU (nothing is run)."""
    monkeypatch.setattr(trainer, "select_device", lambda name: torch.device(device))
    monkeypatch.setattr(loaders, "select_device", lambda name: torch.device(device))
    ids = np.random.default_rng(0).integers(0, 97, 81).astype(np.uint16)
    model = GPTModel(CFG)
    monkeypatch.setattr(model, "to", lambda device: model)
    s = LoopSettings(num_epochs=1, eval_freq=1, eval_iter=1, device=device, batch_size=2)
    data = loaders.make_loaders(TokenWindowDataset(ids, 8, 8), TokenWindowDataset(ids[:41], 8, 8), s)
    return Trainer(model, data, s, progress=False)


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cpu", False)])
def test_the_trainers_loaders_pin_memory_on_cuda_only(monkeypatch, device, pinned):
    t = _trainer(monkeypatch, device)
    assert t.device.type == device
    assert t.loaders.train.pin_memory is t.loaders.train_eval.pin_memory is t.loaders.val.pin_memory is pinned


def test_adamw_is_fused_on_cuda(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kwargs: seen.append(kwargs))
    for device in ("cuda", "cpu", "meta"):
        p = SimpleNamespace(requires_grad=True, device=torch.device(device))
        make_optimizer(SimpleNamespace(parameters=lambda p=p: [p]), 1e-3, 0.1)
    assert [kw["fused"] for kw in seen] == [True, True, False]
