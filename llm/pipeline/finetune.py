"""The finetuning stages' shared recipe: one runner, the task-specific steps named and overridable.

`FinetuneStage.run()` does, in this order (the order fixes every draw from torch's RNG, so a
stage's results do not depend on how it is written); each step receives what the earlier ones returned:

1. `settings`   read and validate params.yaml, take the stage's section `s`
2. `load_data`  s -> the task's data, split (and the splits written, if the stage keeps them)
3. start        select the device, load the starting model (`init`), the tokenizer
4. `datasets`   s, data, model, tokenizer -> `TaskData`: the datasets ("train" and "val" train the model)
5. seed         `set_seed(seed)`, as the book does right before the new head and the loaders
6. `adapt`      s, model -> the model for the task (the spam stage's classification head)
7. fit          `llm.trainer.Trainer`: resumable, its curve rewritten at every evaluation; a stage's
                `trainer_options` (the loss…) and `epoch_end` (metrics after each epoch) plug in here
8. `evaluate`   s, task, model, history, device -> `Evaluation`: the metrics and extra wall times
9. `save`       the model and the evaluation's other outputs; then the curve, metrics and timings

Steps 7 to 9 run inside `with trainer:`: the stage holds `<state>.lock` (a second run of it stops
at once), and the resume state, saved at the end of training, is removed only once every output
is written. If evaluating or writing fails, a rerun resumes at the end and redoes only steps 8-9.

A third task (say, another classifier) subclasses it and writes steps 2, 4, 6, 8 and 9 only.

LoRA (`lora.rank > 0` in the stage's section, the book's appendix E) is part of the recipe, for every
task: after step 6 every weight freezes and adapters wrap the target layers (`llm.lora.apply_lora`; the
stage's `modules_to_save`, a new head, train in full); after step 7 the adapters (and those modules)
are kept for the adapter checkpoint `<model_dir>/adapter/` and merged into the weights, so steps 8 and 9
see an ordinary model and `<model_dir>/` holds the merged one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from llm import distributed
from llm.checkpoint import checkpoint_meta, read_checkpoint, save_adapter, weights_sha256
from llm.errors import ConfigError
from llm.files import write_csv, write_json
from llm.loaders import make_loaders
from llm.lora import adapter_state_dict, apply_lora, count_parameters, merge_lora
from llm.model import GPTModel
from llm.pipeline.params import LoopParams, LoraParams, Params, init_source, load_params
from llm.resume import History, run_params
from llm.runtime import keep_freed_memory, machine, peak_memory_mib, select_device, set_seed, set_threads
from llm.settings import LoopSettings
from llm.tokenizer import get_tokenizer
from llm.trainer import Trainer


@dataclass(frozen=True)
class Outputs:
    """Where a finetuning stage writes: named once here and in dvc.yaml."""

    model_dir: Path
    curve: Path  # loss curve, a DVC plot
    metrics: Path
    timings: Path  # wall times: a cached output, not a metric
    state: Path  # resumable state while interrupted; never a DVC output


@dataclass
class TaskData:
    """What a stage's `datasets` step returns, for the steps after it: the splits as datasets ("train"
    and "val" train the model; e.g. "test" is the stage's own) and the collate function of the loaders.
    A stage that needs more later (its raw splits, the tokenizer…) subclasses it."""

    sets: dict[str, Dataset]
    collate_fn: Callable | None = None


@dataclass
class Evaluation:
    """What a stage's `evaluate` step returns: its metrics, extra wall times, and what `save` writes
    besides the model (e.g. the test set's responses)."""

    metrics: dict[str, Any]
    timings: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


def lora_params(s: LoopParams) -> LoraParams:
    """The section's `lora` settings; off for a section without them (a task of one's own)."""
    return getattr(s, "lora", None) or LoraParams()


class FinetuneStage:
    """One finetuning stage: subclass, set `section` and `outputs`, write the task's steps."""

    section: str  # the params.yaml section, e.g. "finetune_spam"
    outputs: Outputs
    modules_to_save: tuple[str, ...] = ()  # modules `adapt` adds, which train in full under LoRA (peft's name)

    # --- steps a stage writes ----------------------------------------------------------------------
    def load_data(self, s: LoopParams) -> Any:
        """The task's data, split: whatever `datasets` takes."""
        raise NotImplementedError

    def datasets(self, s: LoopParams, data: Any, model: GPTModel, tokenizer) -> TaskData:
        raise NotImplementedError

    def adapt(self, s: LoopParams, model: GPTModel) -> GPTModel:
        """The model to train, after seeding (e.g. with a new head). Default: unchanged."""
        return model

    def trainer_options(self, s: LoopParams, task: TaskData) -> dict[str, Any]:
        """Extra `Trainer` arguments: loss_fn, evaluate_fn…"""
        return {}

    # A stage's metrics after each epoch, `epoch_end(s, task, model, epoch, history, device)`: the Trainer's
    # `on_epoch_end`, seeing the History so far (with the epochs before a resume); a dict it returns is kept
    # in `history.epoch_metrics` and in the resume state. None: nothing runs after an epoch.
    epoch_end: Callable[..., dict[str, Any] | None] | None = None

    def evaluate(self, s: LoopParams, task: TaskData, model: GPTModel, history: History, device) -> Evaluation:
        raise NotImplementedError

    def save(self, s: LoopParams, task: TaskData, model: GPTModel, init: str, evaluation: Evaluation) -> None:
        raise NotImplementedError

    def summary(self, evaluation: Evaluation, train_seconds: float) -> str:
        return f"{self.section}: {train_seconds:.0f} s of training"

    # --- LoRA ----------------------------------------------------------------------------------------
    def add_adapters(self, s: LoopParams, model: GPTModel) -> None:
        """Freeze the model and wrap the target layers in adapters; the `modules_to_save` train in full."""
        lora = lora_params(s)
        rank, emb_dim = lora.rank, model.cfg["emb_dim"]
        if rank > emb_dim:
            raise ConfigError(
                f"{self.section}.lora.rank ({rank}) exceeds the model's emb_dim ({emb_dim}): a larger rank adds "
                "parameters, not capacity"
            )
        apply_lora(model, rank, lora.alpha, lora.targets, modules_to_save=self.modules_to_save)
        n = count_parameters(model)
        print(f"LoRA rank {rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)}: "
              f"{n['trainable']:,} of {n['total']:,} parameters train ({n['trainable'] / n['total']:.2%})")  # fmt: skip

    def lora_meta(self, s: LoopParams) -> dict[str, Any]:
        """What a LoRA run records in its checkpoints' config ({} without LoRA)."""
        lora = lora_params(s)
        if not lora.rank:
            return {}
        settings = {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}
        return {"lora": {**settings, "modules_to_save": list(self.modules_to_save)}}

    def adapter_extra(self) -> dict[str, Any]:
        """What the merged checkpoint's config.json records besides the model and LoRA settings: the adapter
        checkpoint records it too, so that it reads like the merged one (a classifier's settings…)."""
        meta = checkpoint_meta(self.outputs.model_dir)
        return {k: v for k, v in meta.items() if k not in ("format", "model", "lora")}

    # --- the recipe ------------------------------------------------------------------------------
    def module(self) -> str:
        """The stage's module, which torchrun runs when nproc_per_node > 1."""
        return type(self).__module__

    def settings(self, params: Params) -> LoopParams:
        return getattr(params, self.section)

    def loop_settings(self, s: LoopParams) -> LoopSettings:
        return s.settings()

    def run(self, params_path: str | Path = "params.yaml") -> dict:
        params = load_params(params_path)
        s = self.settings(params)
        distributed.start(s, self.module(), params_path)  # nproc_per_node > 1: torchrun runs the processes
        set_threads(params.runtime.threads)
        data = self.load_data(s)
        select_device(s.device)  # an unavailable device stops the stage before the model loads
        keep_freed_memory()  # faster steps on CPU: see llm/runtime.py and bench/
        init = init_source(s.init)
        start = read_checkpoint(init)
        model = start.model()
        base = {"base_sha256": weights_sha256(start.state), "base_config": start.cfg} if lora_params(s).rank else {}
        del start  # the weights live in the model now
        task = self.datasets(s, data, model, get_tokenizer())

        set_seed(s.seed)  # the book: torch.manual_seed(123) before the new head and the loaders
        model = self.adapt(s, model)
        lora = lora_params(s).rank > 0
        if lora:
            self.add_adapters(s, model)
        param_counts = count_parameters(model)
        model.train()
        out, loop = self.outputs, self.loop_settings(s)
        options = self.trainer_options(s, task)
        if self.epoch_end is not None:  # `trainer` is bound below, before fit() runs the hook
            options["on_epoch_end"] = lambda m, epoch: self.epoch_end(
                s, task, m, epoch, trainer.history, trainer.device
            )
        trainer = Trainer(
            model,
            make_loaders(task.sets["train"], task.sets["val"], loop, task.collate_fn),
            loop,
            on_record=lambda h: write_csv(out.curve, h.rows()),
            state_path=out.state,
            run_id={"params": run_params(s)},  # the Trainer adds hashes of the starting weights and of the data
            **options,
        )
        device = trainer.device  # where the model is (under DDP on CUDA: this rank's GPU)
        with trainer:  # the resume state goes only once every output below is written
            started = time.perf_counter()
            history = trainer.fit()
            train_seconds = time.perf_counter() - started
            if not trainer.is_main:  # rank 0 evaluates and writes every output
                return {}

            if lora:  # keep the adapters, then evaluate and save the merged model
                adapter = adapter_state_dict(model, self.modules_to_save)
                merge_lora(model)
            evaluation = self.evaluate(s, task, model, history, device)
            metrics = evaluation.metrics
            metrics.update(trainer.process_metrics())  # global_batch and processes, with several processes
            metrics["parameters"] = param_counts
            self.save(s, task, model, str(init), evaluation)
            adapter_out = out.model_dir / "adapter"
            if lora:
                save_adapter(adapter, adapter_out, lora=self.lora_meta(s)["lora"], base=str(init), **base,
                             extra=self.adapter_extra())  # fmt: skip
            elif adapter_out.exists():  # an adapter of an earlier LoRA run no longer goes with the model
                shutil.rmtree(adapter_out)
            write_csv(out.curve, history.rows())
            write_json(out.metrics, metrics)
            write_json(out.timings, {"train_seconds": train_seconds, **evaluation.timings, "device": str(device),
                                     **machine(), **peak_memory_mib(device)})  # fmt: skip
        print(self.summary(evaluation, train_seconds))
        return metrics
