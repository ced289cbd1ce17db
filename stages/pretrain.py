"""Stage pretrain: the book's chapter-5 pretraining loop on the token files.

Reads params `model`, `train`, `runtime` and `data/tokens/`; writes the checkpoint `models/pretrain/`, the
loss curve `metrics/curves/pretrain.csv` (rewritten at every evaluation), `metrics/pretrain.json`
and the wall times in `timings/pretrain.json` (outputs other than the timings depend only on code,
data and params). Ctrl-C or SIGTERM saves a resumable
state in `models/resume/`; running the stage again with the same params, starting weights and data
continues from it. The state of a finished run stays until every output is written (a failed
write resumes at the end), and `models/resume/pretrain.pt.lock` stops a second run at once.
`model.init` starts from scratch (the book) or from weights: GPT-2 or a checkpoint. With
`train.num_epochs: 0` the stage only measures the starting weights and passes them on.
"""

import platform
import time
from pathlib import Path

import torch

from llm import distributed
from llm.checkpoint import load_checkpoint, reconfigure, save_checkpoint
from llm.config import config_for_weights
from llm.data import split_windows
from llm.errors import ConfigError, run_main
from llm.files import write_csv, write_json
from llm.generate import generate
from llm.loaders import make_loaders
from llm.model import GPTModel
from llm.pipeline.params import load_params
from llm.resume import fingerprint, run_params
from llm.runtime import keep_freed_memory, machine, set_seed, set_threads
from llm.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from llm.trainer import Trainer

TOKENS = Path("data/tokens")
MODEL_DIR = Path("models/pretrain")
STATE = Path("models/resume/pretrain.pt")
CURVE = Path("metrics/curves/pretrain.csv")
METRICS = Path("metrics/pretrain.json")
TIMINGS = Path("timings/pretrain.json")


def main(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    t = params.train
    distributed.start(t, __name__, params_path)  # train.nproc_per_node > 1: torchrun runs this stage's processes
    set_threads(params.runtime.threads)
    keep_freed_memory()  # faster steps on CPU: see llm/runtime.py and bench/
    model, cfg = initial_model(params)
    # one line if a split is too small, or holds an id the model cannot embed (model.vocab_size)
    train_set, val_set = split_windows(TOKENS, t.max_length, t.stride, cfg["vocab_size"])
    train_ids, val_ids = train_set.ids, val_set.ids
    tokenizer = get_tokenizer()

    def sample(model, epoch):
        if t.start_context:
            idx = text_to_token_ids(t.start_context, tokenizer).to(next(model.parameters()).device)
            out = generate(model, idx, 50, cfg["context_length"])
            print(f"[epoch {epoch}] " + token_ids_to_text(out, tokenizer).replace("\n", " "))

    run_id = {"model": cfg, "init": params.model.init, "train": run_params(t), "tokens": [len(train_ids), len(val_ids)]}
    loop = t.settings()
    trainer = Trainer(
        model,
        make_loaders(train_set, val_set, loop),
        loop,
        on_epoch_end=sample,
        on_record=lambda h: write_csv(CURVE, h.rows()),
        state_path=STATE,
        run_id=run_id,
    )
    with trainer:  # the resume state goes only once every output below is written
        started = time.perf_counter()
        history = trainer.fit()
        wall = time.perf_counter() - started
        if not trainer.is_main:  # rank 0 writes every output
            return {}
        metrics = write_outputs(model, trainer, history, params, run_id, wall)
    print(
        f"train loss {metrics['train']['loss']:.3f}, val loss {metrics['val']['loss']:.3f}, "
        f"{history.train_seconds:.1f} s on {trainer.device}"
    )
    return metrics


def write_outputs(model, trainer, history, params, run_id, wall: float) -> dict:
    """The checkpoint, curve, metrics and timings of a finished run; returns the metrics."""
    t = params.train
    metrics = {
        "train": {"loss": history.train_loss[-1]},
        "val": {"loss": history.val_loss[-1]},
        "tokens_seen": history.total_tokens,
        "steps": history.steps,
        "epochs": trainer.epoch,  # begun, the last one perhaps cut short by train.max_steps
        "params": model.num_params(),
    }
    metrics.update(trainer.process_metrics())  # global_batch and processes, with several processes
    timings = {
        "train_seconds": history.train_seconds,
        "wall_seconds": wall,
        "tokens_per_sec": history.total_tokens / history.train_seconds if history.train_seconds else None,
    }
    info = {
        "init": params.model.init,
        "device": str(trainer.device),
        "precision": t.precision,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "run_id": fingerprint(run_id),
    }
    save_checkpoint(model, MODEL_DIR, extra={"training": {**metrics, **info}})
    write_csv(CURVE, history.rows())
    write_json(METRICS, metrics)
    write_json(TIMINGS, {**timings, "device": info["device"], **machine()})  # threads and CPU: they decide the bits
    return metrics


def initial_model(params) -> tuple[GPTModel, dict]:
    """The model to train: new from `model.*` (the book), or loaded weights with `model.*` checked."""
    t, init = params.train, params.model.init
    if init == "scratch":
        set_seed(t.seed)  # the book: torch.manual_seed(123) right before GPTModel(cfg)
        cfg = params.model.config()
        return GPTModel(cfg), cfg
    model = load_checkpoint(init)
    head, emb = model.out_head.weight, model.tok_emb.weight  # GPT-2's head is its embedding (tie_embeddings)
    same = head is emb or (head.shape == emb.shape and torch.equal(head, emb))
    cfg, notes = config_for_weights(model.cfg, params.model.overrides(), init, head_is_embedding=same)
    for note in notes:
        print(note)
    if t.max_length > cfg["context_length"]:
        raise ConfigError(
            f"train.max_length ({t.max_length}) must be <= {init}'s context_length ({cfg['context_length']})"
        )
    set_seed(t.seed)  # data order and dropout
    return reconfigure(model, cfg).train(), cfg


if __name__ == "__main__":
    run_main("pretrain", main, doc=__doc__)
