"""Multi-process (DDP) training on CPU with gloo, two processes: the same run as one process at twice
the batch, the same run with `compile`, disjoint shards that cover each epoch, files from rank 0 only,
and a stage relaunched through torchrun (`train.nproc_per_node: 2`)."""

import functools
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.data import TokenWindowDataset
from llm.model import GPTModel
from llm.trainer import EpochSampler, Trainer
from tests.conftest import ROOT, committed_yaml, tiny_cfg

CFG = tiny_cfg(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
B = 2  # the per-process batch; one process trains at 2 * B
# Measured (torch 2.13, CPU): the losses agree to 4.8e-7, the weights after 4 AdamW steps to 3.9e-5 (1e-5 of
# the largest weight): the same sums in another order, which Adam's normalised step enlarges in tiny gradients.
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-4


def settings(batch_size, compile=False):
    """16 windows = 2 steps of 2 x 4 examples per epoch, 2 epochs; accumulation, a schedule and clipping."""
    from types import SimpleNamespace

    return SimpleNamespace(
        seed=7, num_epochs=2, batch_size=batch_size, lr=5e-3, weight_decay=0.1, eval_freq=1, eval_iter=2,
        warmup_steps=1, lr_schedule="cosine", min_lr=1e-4, grad_clip=1.0, grad_accum_steps=2,
        precision="fp32", device="cpu", checkpoint_every=1, compile=compile,
    )  # fmt: skip


def datasets():
    rng = np.random.default_rng(0)
    train = TokenWindowDataset(rng.integers(0, 97, 16 * 8 + 1).astype(np.uint16), 8, 8)  # 16 windows
    val = TokenWindowDataset(rng.integers(0, 97, 8 * 8 + 1).astype(np.uint16), 8, 8)  # 8 windows
    return train, val


def train(batch_size, out_dir, compile=False):
    """(history, final weights) of a run; its resume state and curve go to `out_dir`."""
    from llm.io import write_csv

    torch.manual_seed(7)
    model = GPTModel(CFG)
    train_set, val_set = datasets()
    os.makedirs(out_dir, exist_ok=True)
    trainer = Trainer(
        model, train_set, val_set, settings(batch_size, compile), state_path=os.path.join(out_dir, "state.pt"),
        run_id="ddp",
        on_record=lambda h: write_csv(os.path.join(out_dir, "curve.csv"), h.rows()), progress=False,
        log=lambda m: None,
    )  # fmt: skip
    history = trainer.fit()
    return history, {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


def worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # ranks whose RNGs differ still share rank 0's permutation
        shards = {
            "even": list(EpochSampler(11, True, rank, world, even=True)),
            "all": list(EpochSampler(11, True, rank, world)),
        }
        history, weights, trainer = train(B, os.path.join(tmp, f"rank{rank}"))
        torch.save({"history": history.__dict__, "weights": weights, "shards": shards}, os.path.join(tmp, f"{rank}.pt"))
        # the same run with `compile`, on a backend that needs no C++ compiler (see test_trainer.py)
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
        history, weights, trainer = train(B, os.path.join(tmp, "compiled", f"rank{rank}"), compile=True)
        torch.save({"history": history.__dict__, "weights": weights}, os.path.join(tmp, "compiled", f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(2)]


def test_two_processes_at_batch_b_train_like_one_at_2b(two_processes, tmp_path):
    _, ranks = two_processes
    history, weights, _ = train(2 * B, tmp_path / "one")
    for r in ranks:  # every rank records the whole-split losses
        h = r["history"]
        assert h["step"] == history.step and h["examples_seen"] == history.examples_seen
        assert h["tokens_seen"] == history.tokens_seen and h["steps"] == history.steps == 4
        assert np.allclose(h["train_loss"], history.train_loss, rtol=0, atol=LOSS_TOLERANCE)
        assert np.allclose(h["val_loss"], history.val_loss, rtol=0, atol=LOSS_TOLERANCE)
        for name, w in weights.items():
            assert torch.allclose(r["weights"][name], w, rtol=0, atol=WEIGHT_TOLERANCE), name


def test_compile_composes_with_ddp(two_processes):
    """`compile`: the DDP-wrapped module compiled, two processes train as they do without it; the saved
    state holds the plain module's weights."""
    tmp, eager = two_processes
    for rank in range(2):
        compiled = torch.load(tmp / "compiled" / f"{rank}.pt", weights_only=False)
        h, ref = compiled["history"], eager[rank]["history"]
        assert h["steps"] == ref["steps"] == 4
        assert np.allclose(h["train_loss"], ref["train_loss"], rtol=0, atol=LOSS_TOLERANCE)
        assert np.allclose(h["val_loss"], ref["val_loss"], rtol=0, atol=LOSS_TOLERANCE)
        for name, w in eager[rank]["weights"].items():
            assert torch.allclose(compiled["weights"][name], w, rtol=0, atol=WEIGHT_TOLERANCE), name
    state = torch.load(tmp / "compiled" / "rank0" / "state.pt", weights_only=True)
    assert not any("_orig_mod" in key or "module." in key for key in state["model"])


def test_shards_are_disjoint_equal_and_cover_the_epoch(two_processes):
    _, ranks = two_processes
    even = [r["shards"]["even"] for r in ranks]
    assert len(even[0]) == len(even[1]) == 5 and not set(even[0]) & set(even[1])
    full = [r["shards"]["all"] for r in ranks]
    assert sorted(full[0] + full[1]) == list(range(11)) and not set(full[0]) & set(full[1])
    assert set(even[0] + even[1]) <= set(range(11))  # disjoint although each rank's RNG differed: rank 0's seed


def test_only_rank_0_writes(two_processes):
    tmp, _ = two_processes
    assert sorted(p.name for p in (tmp / "rank0").iterdir()) == ["curve.csv", "state.pt"]
    assert not (tmp / "rank1").exists() or not any((tmp / "rank1").iterdir())


def test_pretrain_stage_with_two_processes(tmp_path):
    """`python -m stages.pretrain` with train.nproc_per_node 2 relaunches itself through torchrun."""
    raw = committed_yaml("params.yaml")
    raw["model"].update(context_length=16, emb_dim=16, n_heads=2, n_layers=1, vocab_size=97, drop_rate=0.0)
    raw["train"].update(
        num_epochs=1, batch_size=2, max_length=8, stride=8, eval_freq=1, eval_iter=1, start_context="",
        device="cpu", nproc_per_node=2,
    )  # fmt: skip
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    tokens = tmp_path / "data" / "tokens"
    tokens.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, windows in (("train", 8), ("val", 4)):
        rng.integers(0, 97, windows * 8 + 1).astype(np.uint16).tofile(tokens / f"{split}.bin")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "stages.pretrain"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["global_batch"] == 4 and metrics["processes"] == 2
    assert metrics["steps"] == 2 and metrics["tokens_seen"] == 8 * 8  # 8 windows of 8 tokens, 2 steps of 2 x 2
    assert (tmp_path / "models" / "pretrain").is_dir() and not (tmp_path / "models" / "resume" / "pretrain.pt").exists()
    assert out.stdout.count("train loss") == 1  # rank 0 alone reports
