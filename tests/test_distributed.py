"""Multi-process (DDP) training on CPU with gloo, two processes (docs/training.md): the same run as one
process at twice the batch (dropout 0, accumulation, warmup + cosine, clipping: losses within 4.8e-7,
weights within 3.9e-5 after 4 AdamW steps; also with `compile`); both finetuning stages under DDP
against one process at twice the batch (curves within 1e-5); disjoint shards that cover each epoch;
files from rank 0 only; each rank's own dropout stream; states saved by 2 processes resumed on 1 and
the other way round, and by 2 on 2 with dropout, bit for bit; the stages relaunched through torchrun
(`nproc_per_node: 2`), stopped by SIGTERM to the stage and Ctrl-C to its process group, then resumed
on one process. The two-node recipe (two torchrun agents on 127.0.0.1, then `dvc commit`) and
`dvc exp run -S finetune_spam.nproc_per_node=2` run in tests/test_pipeline.py. Not tested: GPUs (nccl),
more than one machine."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.data import TokenWindowDataset
from llm.distributed import rank_seed
from llm.loaders import EpochSampler, make_loaders
from llm.model import GPTModel
from llm.settings import LoopSettings
from llm.trainer import Trainer, TrainingInterrupted
from tests.conftest import ROOT, committed_yaml, tiny_cfg

CFG = tiny_cfg(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
B = 2  # the per-process batch; one process trains at 2 * B
# Measured (torch 2.13, CPU): the losses agree to 4.8e-7, the weights after 4 AdamW steps to 3.9e-5 (1e-5 of
# the largest weight): the same sums in another order, which Adam's normalised step enlarges in tiny gradients.
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-4


def settings(batch_size, compile=False, optimizer="adamw"):
    """16 windows = 2 steps of 2 x 4 examples per epoch, 2 epochs; accumulation, a schedule and clipping."""
    return LoopSettings(
        seed=7, num_epochs=2, batch_size=batch_size, lr=5e-3, weight_decay=0.1, eval_freq=1, eval_iter=2,
        warmup_steps=1, lr_schedule="cosine", min_lr=1e-4, grad_clip=1.0, grad_accum_steps=2,
        precision="fp32", device="cpu", checkpoint_every=1, compile=compile, optimizer=optimizer,
    )  # fmt: skip


def datasets():
    rng = np.random.default_rng(0)
    train = TokenWindowDataset(rng.integers(0, 97, 16 * 8 + 1).astype(np.uint16), 8, 8)  # 16 windows
    val = TokenWindowDataset(rng.integers(0, 97, 8 * 8 + 1).astype(np.uint16), 8, 8)  # 8 windows
    return train, val


def train(batch_size, out_dir, drop_rate=0.0, stop_after=None, state=None, log=None, compile=False, optimizer="adamw"):
    """(history, final weights, trainer) of a run; its resume state (`state`, or in `out_dir`) and curve
    go to `out_dir`. `stop_after`: rank 0 asks to stop once step `stop_after` is recorded, as a signal
    would; the run then ends with TrainingInterrupted and its resume state saved (history None)."""
    from llm.files import write_csv

    torch.manual_seed(7)
    model = GPTModel({**CFG, "drop_rate": drop_rate})
    train_set, val_set = datasets()
    os.makedirs(out_dir, exist_ok=True)
    trainer = None

    def on_record(h):
        write_csv(os.path.join(out_dir, "curve.csv"), h.rows())
        if h.step[-1] == stop_after:
            trainer.request_stop()

    s = settings(batch_size, compile, optimizer)
    trainer = Trainer(
        model, make_loaders(train_set, val_set, s), s, state_path=state or os.path.join(out_dir, "state.pt"),
        run_id="ddp", on_record=on_record, progress=False, log=(log.append if log is not None else lambda m: None),
    )  # fmt: skip
    try:
        history = trainer.fit()
    except TrainingInterrupted:
        history = None
    return history, {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


def worker(rank, world, port, tmp, scenario="shards"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = SCENARIOS[scenario](rank, tmp)
        torch.save(out, os.path.join(tmp, f"{scenario}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def shards(rank, tmp):
    torch.manual_seed(100 + rank)  # ranks whose RNGs differ still share rank 0's permutation
    result = {
        "even": list(EpochSampler(11, True, rank, 2, even=True)),
        "all": list(EpochSampler(11, True, rank, 2)),
    }
    history, weights, _ = train(B, os.path.join(tmp, f"rank{rank}"))
    return {"history": history.__dict__, "weights": weights, **result}


def compiled(rank, tmp):
    """The shards scenario's run with `compile`, on a backend that needs no C++ compiler (see test_trainer.py)."""
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    history, weights, _ = train(B, os.path.join(tmp, "compiled", f"rank{rank}"), compile=True)
    return {"history": history.__dict__, "weights": weights}


def muon(rank, tmp):
    """The shards scenario's run with `optimizer: muon` (Muon for the blocks' matrices, AdamW for the rest)."""
    history, weights, _ = train(B, os.path.join(tmp, "muon", f"rank{rank}"), optimizer="muon")
    return {"history": history.__dict__, "weights": weights}


def first_forward_rng(rank, tmp):
    """Each rank's RNG state when the first training forward pass starts (dropout 0.1)."""
    states = []
    torch.manual_seed(7)
    model = GPTModel({**CFG, "drop_rate": 0.1})
    model.register_forward_pre_hook(lambda m, args: states.append(torch.get_rng_state()) if m.training else None)
    trainer = Trainer(model, make_loaders(*datasets(), settings(B)), settings(B), progress=False, log=lambda m: None)
    trainer.fit()
    return {"rng": states[0], "epoch_seed": trainer.sampler.seed}


def interrupted(drop_rate):
    def run(rank, tmp):
        state = os.path.join(tmp, "shared-state.pt")
        train(B, os.path.join(tmp, f"stop-rank{rank}"), drop_rate, stop_after=0, state=state)
        return {}

    return run


def resumed(drop_rate, state_name):
    def run(rank, tmp):
        logs = []
        state = os.path.join(tmp, state_name)
        history, weights, _ = train(B, os.path.join(tmp, f"resume-rank{rank}"), drop_rate, state=state, log=logs)
        return {"history": history.__dict__, "weights": weights, "logs": logs}

    return run


def uninterrupted(drop_rate):
    def run(rank, tmp):
        history, weights, _ = train(B, os.path.join(tmp, f"plain-rank{rank}"), drop_rate)
        return {"history": history.__dict__, "weights": weights}

    return run


SCENARIOS = {
    "shards": shards,
    "compiled": compiled,
    "muon": muon,
    "rng": first_forward_rng,
    "stop": interrupted(0.0),
    "resume-1": resumed(0.0, "one-state.pt"),
    "resume-2": resumed(0.0, "shared-state.pt"),
    "stop-dropout": interrupted(0.1),
    "resume-dropout": resumed(0.1, "shared-state.pt"),
    "plain-dropout": uninterrupted(0.1),
}


def spawn(tmp, *scenarios):
    """Run scenarios one after another, each in two fresh processes; their results, rank by rank."""
    results = {}
    for name in scenarios:
        mp.spawn(worker, args=(2, free_port(), str(tmp), name), nprocs=2, join=True)
        results[name] = [torch.load(os.path.join(tmp, f"{name}-{r}.pt"), weights_only=False) for r in range(2)]
    return results


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp, spawn(tmp, "shards")["shards"]


def test_two_processes_at_batch_b_train_like_one_at_2b(two_processes, tmp_path):
    _, ranks = two_processes
    history, weights, _ = train(2 * B, tmp_path / "one")
    for r in ranks:  # every rank records the whole-split losses
        same_run(r, history, weights)


def same_run(rank_result, history, weights):
    h = rank_result["history"]
    assert h["step"] == history.step and h["examples_seen"] == history.examples_seen
    assert h["tokens_seen"] == history.tokens_seen and h["steps"] == history.steps == 4
    assert np.allclose(h["train_loss"], history.train_loss, rtol=0, atol=LOSS_TOLERANCE)
    assert np.allclose(h["val_loss"], history.val_loss, rtol=0, atol=LOSS_TOLERANCE)
    for name, w in weights.items():
        assert torch.allclose(rank_result["weights"][name], w, rtol=0, atol=WEIGHT_TOLERANCE), name


def test_compile_composes_with_ddp(two_processes):
    """`compile`: the DDP-wrapped module compiled, two processes train as they do without it; the saved
    state holds the plain module's weights."""
    tmp, eager = two_processes
    for rank, compiled_rank in enumerate(spawn(tmp, "compiled")["compiled"]):
        h, ref = compiled_rank["history"], eager[rank]["history"]
        assert h["steps"] == ref["steps"] == 4
        assert np.allclose(h["train_loss"], ref["train_loss"], rtol=0, atol=LOSS_TOLERANCE)
        assert np.allclose(h["val_loss"], ref["val_loss"], rtol=0, atol=LOSS_TOLERANCE)
        for name, w in eager[rank]["weights"].items():
            assert torch.allclose(compiled_rank["weights"][name], w, rtol=0, atol=WEIGHT_TOLERANCE), name
    state = torch.load(tmp / "compiled" / "rank0" / "state.pt", weights_only=True)
    assert not any("_orig_mod" in key or "module." in key for key in state["model"])


def test_muon_on_two_processes_trains_like_one_at_twice_the_batch(tmp_path):
    """`train.optimizer: muon` under DDP: the ranks' averaged gradients give every rank Muon's same update,
    as one process at twice the batch."""
    (rank0, rank1) = spawn(tmp_path, "muon")["muon"]
    history, weights, _ = train(2 * B, tmp_path / "one-muon", optimizer="muon")
    for r in (rank0, rank1):
        same_run(r, history, weights)


def test_shards_are_disjoint_equal_and_cover_the_epoch(two_processes):
    _, ranks = two_processes
    even = [r["even"] for r in ranks]
    assert len(even[0]) == len(even[1]) == 5 and not set(even[0]) & set(even[1])
    full = [r["all"] for r in ranks]
    assert sorted(full[0] + full[1]) == list(range(11)) and not set(full[0]) & set(full[1])
    assert set(even[0] + even[1]) <= set(range(11))  # disjoint although each rank's RNG differed: rank 0's seed


def test_only_rank_0_writes(two_processes):
    tmp, _ = two_processes
    assert sorted(p.name for p in (tmp / "rank0").iterdir()) == ["curve.csv", "state.pt"]
    assert not (tmp / "rank1").exists() or not any((tmp / "rank1").iterdir())


def test_ranks_draw_their_own_dropout_masks(tmp_path):
    """Every rank's dropout stream of an epoch is seeded with rank_seed(the epoch's seed, rank)."""
    ranks = spawn(tmp_path, "rng")["rng"]
    assert ranks[0]["epoch_seed"] == ranks[1]["epoch_seed"]
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    for rank, r in enumerate(ranks):
        first_epoch_seed = r["rng"]  # the state when the first epoch's first forward pass starts
        assert torch.equal(first_epoch_seed, torch.manual_seed(rank_seed(seed_of_first_epoch(), rank)).get_state())


def seed_of_first_epoch() -> int:
    """The first epoch's permutation seed of the runs above: the first pass draws it right after the
    DataLoader's base seed, from the RNG as `torch.manual_seed(7)` and GPTModel(CFG) left it."""
    torch.manual_seed(7)
    GPTModel({**CFG, "drop_rate": 0.1})
    torch.empty((), dtype=torch.int64).random_()  # the DataLoader's base seed
    return int(torch.empty((), dtype=torch.int64).random_().item())


def test_a_state_saved_by_two_processes_resumes_on_one(tmp_path):
    """Stopped mid-epoch after step 1 by two processes at batch B, finished by one at batch 2B: the
    same run as one process at 2B throughout (dropout 0; within the tolerances above)."""
    spawn(tmp_path, "stop")
    assert (tmp_path / "shared-state.pt").is_file() and not (tmp_path / "stop-rank1").joinpath("state.pt").exists()
    state = torch.load(tmp_path / "shared-state.pt", weights_only=True)
    assert state["step"] == 1 and state["batches_done"] == 2 and state["world_size"] == 2
    logs = []
    history, weights, trainer = train(2 * B, tmp_path / "one", state=tmp_path / "shared-state.pt", log=logs)
    assert any(m.startswith("resuming from") and "step 1" in m for m in logs), logs
    reference, ref_weights, _ = train(2 * B, tmp_path / "reference")
    same_run({"history": history.__dict__, "weights": weights}, reference, ref_weights)


def test_a_state_saved_by_one_process_resumes_on_two(tmp_path):
    train(2 * B, tmp_path / "one", stop_after=0, state=tmp_path / "one-state.pt")
    assert torch.load(tmp_path / "one-state.pt", weights_only=True)["world_size"] == 1
    ranks = spawn(tmp_path, "resume-1")["resume-1"]
    assert any(m.startswith("resuming from") and "step 1" in m for m in ranks[0]["logs"]), ranks[0]["logs"]
    reference, ref_weights, _ = train(2 * B, tmp_path / "reference")
    for r in ranks:
        same_run(r, reference, ref_weights)


def test_with_dropout_a_resumed_run_equals_the_uninterrupted_one_on_as_many_processes(tmp_path):
    """Each rank takes back its own RNG state: the ranks' dropout masks continue where they were."""
    runs = spawn(tmp_path, "stop-dropout", "resume-dropout", "plain-dropout")
    assert any(m.startswith("resuming from") for m in runs["resume-dropout"][0]["logs"])
    for resumed_rank, plain_rank in zip(runs["resume-dropout"], runs["plain-dropout"], strict=True):
        assert resumed_rank["history"]["train_loss"] == plain_rank["history"]["train_loss"]
        assert resumed_rank["history"]["val_loss"] == plain_rank["history"]["val_loss"]
        for name, w in plain_rank["weights"].items():
            assert torch.equal(resumed_rank["weights"][name], w), name


def stage_project(tmp_path, threads: int | None = 1, **train):
    """A project folder for `python -m stages.pretrain`: a tiny model and random token files. One torch
    thread per process (`runtime.threads`; None: the committed value), as two ranks on 2 cores need."""
    raw = committed_yaml("params.yaml")
    raw["model"].update(context_length=16, emb_dim=16, n_heads=2, n_layers=1, vocab_size=97, drop_rate=0.0)
    defaults = dict(num_epochs=1, batch_size=2, max_length=8, stride=8, eval_freq=1, eval_iter=1, start_context="")
    raw["train"].update({**defaults, "device": "cpu", **train})
    if threads is not None:
        raw["runtime"]["threads"] = threads
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    tokens = tmp_path / "data" / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, windows in (("train", 8), ("val", 4)):
        rng.integers(0, 97, windows * 8 + 1).astype(np.uint16).tofile(tokens / f"{split}.bin")
    return tmp_path


STAGE_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_stage(cwd, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "stages.pretrain", *args], cwd=cwd, env=env or STAGE_ENV, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def test_pretrain_stage_with_two_processes(tmp_path):
    """`python -m stages.pretrain` with train.nproc_per_node 2 relaunches itself through torchrun."""
    stage_project(tmp_path, nproc_per_node=2)
    out = run_stage(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert metrics["global_batch"] == 4 and metrics["processes"] == 2
    assert metrics["steps"] == 2 and metrics["tokens_seen"] == 8 * 8  # 8 windows of 8 tokens, 2 steps of 2 x 2
    assert (tmp_path / "models" / "pretrain").is_dir() and not (tmp_path / "models" / "resume" / "pretrain.pt").exists()
    assert out.stdout.count("train loss") == 1  # rank 0 alone reports


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_stage_run_as_a_file_trains_on_one_or_two_processes(tmp_path, nproc):
    """`python stages/pretrain.py` (a file, so `__main__` has no module spec) trains like `python -m
    stages.pretrain`; with two processes torchrun reruns it as the module its path names (was an
    AttributeError on `__spec__.name` even with one process)."""
    import shutil

    project = stage_project(tmp_path, nproc_per_node=nproc)
    shutil.copytree(ROOT / "stages", project / "stages")
    out = subprocess.run(
        [sys.executable, "stages/pretrain.py"], cwd=project, env=STAGE_ENV, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 8 // (2 * nproc) and metrics.get("processes", 1) == nproc  # batch 2 per process


@pytest.mark.parametrize("how", ["SIGTERM to the stage", "Ctrl-C in a terminal"])
def test_a_signal_stops_every_rank_and_one_process_resumes(tmp_path, how):
    """SIGTERM to the stage (as a scheduler sends it), or SIGINT to its process group (Ctrl-C in a
    terminal), reaches every worker once, through torchrun: they stop at the same step, rank 0 saves
    the resume state, the stage exits 130. Rerun on one process at twice the batch (the same examples
    per step) it resumes and ends like a run that was never interrupted."""
    project = stage_project(tmp_path / "ddp", nproc_per_node=2, num_epochs=150)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain"], cwd=project, env=STAGE_ENV, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    seen = []
    for line in proc.stdout:  # wait until training is under way
        seen.append(line)
        if "(Step 000010)" in line:
            if how == "SIGTERM to the stage":
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            break
    seen.extend(proc.stdout)
    assert proc.wait(timeout=120) == 130, "".join(seen)[-3000:]
    log = "".join(seen)
    assert "training interrupted at step" in log and "resume state saved" in log, log[-3000:]
    state = torch.load(project / "models" / "resume" / "pretrain.pt", weights_only=True)
    assert 10 < state["step"] < 300 and state["world_size"] == 2
    assert not (project / "metrics" / "pretrain.json").exists()
    if how != "SIGTERM to the stage":
        return

    params = json.loads((project / "params.yaml").read_text())
    params["train"].update(nproc_per_node=1, batch_size=4)
    (project / "params.yaml").write_text(json.dumps(params))
    out = run_stage(project)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"step {state['step']}" in out.stdout + out.stderr
    resumed = json.loads((project / "metrics" / "pretrain.json").read_text())

    reference = stage_project(tmp_path / "one", nproc_per_node=1, num_epochs=150, batch_size=4)
    assert run_stage(reference).returncode == 0
    plain = json.loads((reference / "metrics" / "pretrain.json").read_text())
    assert resumed["steps"] == plain["steps"] == 300 and resumed["tokens_seen"] == plain["tokens_seen"]
    assert resumed["val"]["loss"] == pytest.approx(plain["val"]["loss"], abs=1e-4)
    assert resumed["train"]["loss"] == pytest.approx(plain["train"]["loss"], abs=1e-4)


def finetune_project(folder, nproc: int, batch_size: int):
    """A project folder for the finetuning stages: a tiny 'pretrained' model, 60 SMS, 40 instructions, 40
    preference pairs (DPO starts from the same model)."""
    from llm.checkpoint import save_checkpoint
    from tests.test_finetune_dpo import preferences
    from tests.test_stage_inputs import instructions, sms

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_checkpoint(GPTModel(tiny_cfg(context_length=64, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)),
                    folder / "models" / "pretrain")  # fmt: skip
    sms(folder, 30, 30)
    raw = committed_yaml("params.yaml")
    common = {"nproc_per_node": nproc, "batch_size": batch_size, "num_epochs": 2, "eval_freq": 2, "device": "cpu"}
    raw["finetune_spam"].update(common)
    raw["finetune_instruct"].update(common, data=instructions(folder, 40), max_new_tokens=4)
    raw["finetune_dpo"].update(common, data=preferences(folder, 40), init="models/pretrain", max_new_tokens=4)
    raw["runtime"]["threads"] = 1  # per process: two ranks on 2 cores
    (folder / "params.yaml").write_text(json.dumps(raw))
    return folder


def run_module(module: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module], cwd=cwd, env=STAGE_ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("stage", ["finetune_spam", "finetune_instruct", "finetune_dpo"])
def test_finetuning_stage_with_two_processes_equals_one_at_twice_the_batch(tmp_path, stage):
    """Both finetuning stages under DDP (dropout 0): the same loss curve and metrics as one process at
    twice the batch, written by rank 0 alone, with the global batch and the number of processes."""
    runs, curves = {}, {}
    for nproc, batch in ((2, 2), (1, 4)):
        project = finetune_project(tmp_path / f"n{nproc}", nproc, batch)
        out = run_module(f"stages.{stage}", project)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[nproc] = json.loads((project / "metrics" / f"{stage}.json").read_text())
        curves[nproc] = (project / "metrics" / "curves" / f"{stage}.csv").read_text().splitlines()
        assert not (project / "models" / "resume").exists() or not any((project / "models" / "resume").iterdir())
    two, one = runs[2], runs[1]
    assert (two.pop("global_batch"), two.pop("processes")) == (4, 2) and "processes" not in one
    assert len(curves[2]) == len(curves[1]) > 5 and curves[2][0] == curves[1][0]  # the same columns, in order
    # Preference pairs differ in length: the padded tokens a batch counts depend on which pairs share it
    # (2 ranks pad 2 pairs each to their own longest, 1 process 4 to theirs); the examples do not.
    padded = stage == "finetune_dpo"
    keep = [i for i, name in enumerate(curves[1][0].split(",")) if not (padded and name == "tokens_seen")]
    for a, b in zip(curves[2][1:], curves[1][1:], strict=True):
        x, y = ([float(v.split(",")[i]) for i in keep] for v in (a, b))
        assert np.allclose(x, y, rtol=0, atol=1e-5)
    if padded:
        two.pop("tokens_seen"), one.pop("tokens_seen")

    def close(a, b, path=""):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), path
            for key in a:
                close(a[key], b[key], f"{path}.{key}")
        elif isinstance(a, float):
            # The final instruction losses are means of per-batch means, each batch padded to its own
            # longest entry: batches of 2 and of 4 weigh the tokens differently.
            tolerance = 1e-3 if stage != "finetune_spam" and path.endswith(".loss") else 1e-4
            assert a == pytest.approx(b, rel=1e-5, abs=tolerance), path
        else:
            assert a == b, path

    close(two, one)


CHILD = """
import os, signal, sys, time
out = sys.argv[1]
def on_term(*_):
    with open(out, "a") as f:
        f.write("TERM ")
    time.sleep(float(os.environ.get("CHILD_SAVES_FOR", "0")))  # as workers finish a step and save
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(out, "a") as f:
    f.write(os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] + " ")
time.sleep(60)
"""

PARENT = """
import sys
import time
from llm.distributed import run_torchrun
sys.exit(run_torchrun([sys.executable, "-c", sys.argv[1], sys.argv[2]]))
"""


def relaunching_parent(out, **kw):
    """A process that runs a stand-in for torchrun through `run_torchrun`, once the child is up."""
    kw.setdefault("env", STAGE_ENV)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(out)], start_new_session=True, **kw)
    for _ in range(200):
        if out.exists() and out.read_text():
            return parent
        time.sleep(0.05)
    raise AssertionError("the child did not start")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_the_relaunching_process_passes_one_sigterm_to_torchrun(tmp_path, how):
    """Ctrl-C or SIGTERM to the stage: torchrun gets one SIGTERM (and TORCH_ELASTIC_SHUTDOWN_TIMEOUT 120
    unless set); the stage killed outright: torchrun still gets SIGTERM (the parent-death signal)."""
    out = tmp_path / "child.txt"
    parent = relaunching_parent(out)
    if how == "SIGINT":  # as a terminal sends Ctrl-C: to the whole foreground process group
        os.killpg(parent.pid, signal.SIGINT)
    else:
        parent.send_signal(getattr(signal, how))
    parent.wait(timeout=30)
    for _ in range(200):
        if "TERM" in out.read_text():
            break
        time.sleep(0.05)
    assert out.read_text().split() == ["120", "TERM"]


def test_a_second_signal_to_the_relaunching_process_is_not_passed_on(tmp_path):
    """While the workers save, another Ctrl-C only says that they are being waited for."""
    out = tmp_path / "child.txt"
    env = {**STAGE_ENV, "CHILD_SAVES_FOR": "2"}
    parent = relaunching_parent(out, stderr=subprocess.PIPE, text=True, env=env)
    parent.send_signal(signal.SIGTERM)
    for _ in range(200):
        if "TERM" in out.read_text():
            break
        time.sleep(0.05)
    parent.send_signal(signal.SIGINT)
    _, stderr = parent.communicate(timeout=30)
    assert out.read_text().split() == ["120", "TERM"]  # one SIGTERM reached the child
    assert "already stopping: waiting for the workers to save" in stderr and parent.returncode == 0, stderr
