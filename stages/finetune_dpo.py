"""Stage finetune_dpo: preference tuning with DPO, the book's chapter-7 bonus, after finetune_instruct.

Reads params `finetune_dpo`, `runtime`, the download `data/raw/preferences/` (or the JSON file that
`finetune_dpo.data` names) and the starting model (`models/instruct`); writes `models/dpo/` (an
instruction model: `llm instruct` and `llm serve` answer with it), `data/dpo/responses.json` (the test
instructions answered by the reference and by the tuned model), the loss and reward curves (rewritten
at every evaluation), `metrics/finetune_dpo.json` and the wall times in `timings/finetune_dpo.json`.

The reference is the starting model itself: its log-probabilities of every pair are computed once,
before training (`llm.dpo.cached_reference`), so each step runs the policy only, on chosen and
rejected as one batch.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.bounds import check_split_sizes
from llm.checkpoint import checkpoint_meta, read_checkpoint, save_checkpoint
from llm.dpo import (
    DPOLoss,
    PreferenceDataset,
    cached_reference,
    collate_with_reference,
    count_pairs,
    load_preferences,
    preference_metrics,
    response_moves,
    usable_pairs,
)
from llm.errors import ConfigError, run_main
from llm.files import write_json
from llm.instruct import answer_test_set, split_instructions
from llm.pipeline.finetune import Evaluation, FinetuneStage, Outputs, TaskData
from llm.pipeline.params import init_source
from llm.pipeline.sources import data_file
from llm.runtime import select_device
from llm.tokenizer import EOT_ID, check_token_ids

RAW = Path("data/raw")
RESPONSES = Path("data/dpo/responses.json")
OUTPUTS = Outputs(
    model_dir=Path("models/dpo"),
    curve=Path("metrics/curves/finetune_dpo.csv"),
    metrics=Path("metrics/finetune_dpo.json"),
    timings=Path("timings/finetune_dpo.json"),
    state=Path("models/resume/finetune_dpo.pt"),  # Ctrl-C/SIGTERM saves here; a rerun resumes
)
SPLITS = ("train", "val", "test")


@dataclass(kw_only=True)
class PreferenceData(TaskData):
    """The datasets ("train", "val", "test": pairs with the reference's cached log-probabilities) and
    what the evaluation reads: the test entries, the tokenizer, the model's context, the reference's
    metrics (measured before training) and the time it took to cache it."""

    test_data: list[dict]
    tokenizer: Any
    context: int
    reference_seconds: float


class DPOStage(FinetuneStage):
    section = "finetune_dpo"
    outputs = OUTPUTS

    def load_data(self, f) -> dict[str, list[dict]]:
        path = data_file(f.data, f"finetune_dpo.data {f.data!r}", RAW)
        data = load_preferences(path, what="finetune_dpo.data")
        train, test, val = split_instructions(data, f.train_frac, f.test_frac)  # the notebook's split
        splits = {"train": train, "val": val, "test": test}
        sizes = {"train": len(train), "test": len(test), "validation": len(val)}
        fractions = {"train_frac": f.train_frac, "test_frac": f.test_frac}
        check_split_sizes(self.section, fractions, sizes, f"{len(data):,} pairs of {path}", f.batch_size)
        return splits

    def collate(self, f, context: int):
        max_len = min(f.allowed_max_length or context, context)
        return lambda batch: collate_with_reference(batch, allowed_max_length=max_len, mask_prompt_tokens=f.mask_prompt)

    def datasets(self, f, splits, model, tokenizer) -> PreferenceData:
        context = model.cfg["context_length"]
        collate = self.collate(f, context)
        device = select_device(f.device)
        model.to(device)
        started = time.perf_counter()
        max_len = min(f.allowed_max_length or context, context)
        sets, test_data = {}, []
        for name in SPLITS:
            entries = splits[name]
            pairs = PreferenceDataset(entries, tokenizer)
            for item in pairs.encoded_texts:  # GPT-2 ids: a model with a smaller vocab_size stops here
                check_token_ids([EOT_ID, *item["chosen"], *item["rejected"]], model.cfg["vocab_size"],
                                f"finetune_dpo: the {name} split")  # fmt: skip
            kept = usable_pairs(pairs, max_len, f.mask_prompt)
            if len(kept) < len(entries):
                print(f"finetune_dpo: {len(entries) - len(kept)} of {len(entries)} {name} pairs left out: "
                      f"no answer token fits in {max_len} tokens")  # fmt: skip
                entries = [entries[i] for i in kept]
                pairs = PreferenceDataset(entries, tokenizer)
            if name == "test":
                test_data = entries
            sets[name] = cached_reference(model, pairs, collate, f.batch_size, device, f.precision)
        fit = {name: len(sets[name]) for name in SPLITS}
        if fit["train"] < f.batch_size or not fit["val"] or not fit["test"]:
            raise ConfigError(
                f"finetune_dpo: the answers of {fit['train']} train, {fit['val']} validation and {fit['test']} test "
                f"pairs fit in {max_len} tokens (finetune_dpo.allowed_max_length, at most the model's context_length "
                f"{context}): too few for one batch of {f.batch_size} and a pair in each split"
            )
        reference_seconds = time.perf_counter() - started
        print(f"reference log-probabilities of {sum(len(s) for s in sets.values()):,} pairs: {reference_seconds:.0f} s")
        return PreferenceData(sets=sets, collate_fn=collate, test_data=test_data, tokenizer=tokenizer,
                              context=context, reference_seconds=reference_seconds)  # fmt: skip

    def trainer_options(self, f, task) -> dict[str, Any]:
        return {"loss_fn": DPOLoss(f.beta, joint=True), "count_fn": count_pairs}

    def evaluate(self, f, task, model, history, device) -> Evaluation:
        metrics: dict[str, Any] = {}
        for name, ds in task.sets.items():  # before: the reference's cached log-probabilities, no forward pass
            metrics[name] = {
                "before": preference_metrics(None, ds, task.collate_fn, f.batch_size, f.beta, device),
                "after": preference_metrics(model, ds, task.collate_fn, f.batch_size, f.beta, device, f.precision),
            }
        reference = read_checkpoint(init_source(f.init)).model(device)  # the starting weights, to answer
        started = time.perf_counter()
        entries = [dict(e) for e in task.test_data]
        for who, m in (("reference", reference), ("policy", model)):  # in batches, each as `generate` alone
            m.eval()
            answers = answer_test_set(m, entries, "alpaca", f.max_new_tokens, f.eos_id, progress=f"{who} responses")
            for entry, answer in zip(entries, answers, strict=True):
                entry[f"{who}_response"] = answer
        generate_seconds = time.perf_counter() - started
        moves = response_moves(entries)
        metrics["test"]["before"].update(moves["before"])
        metrics["test"]["after"].update(moves["after"])
        metrics.update({"steps": history.steps, "tokens_seen": history.total_tokens})
        timings = {"reference_seconds": task.reference_seconds, "generate_seconds": generate_seconds}
        return Evaluation(metrics, timings, {"responses": entries})

    def save(self, f, task, model, init, evaluation):
        start = checkpoint_meta(init) if Path(init).is_dir() else {}
        instruct = {**start.get("instruct", {}), "prompt_style": "alpaca"}  # an instruction model, as it started
        meta = {"instruct": instruct, "dpo": {"init": init, "beta": f.beta}, **self.lora_meta(f)}
        save_checkpoint(model, self.outputs.model_dir, extra=meta)
        write_json(RESPONSES, evaluation.outputs["responses"])

    def summary(self, evaluation, train_seconds):
        test = evaluation.metrics["test"]
        before, after = test["before"], test["after"]
        lines = [
            f"{train_seconds:.0f} s of training; test pairs: reward margin {after['reward_margin']:.3f}, "
            f"preference accuracy {after['preference_accuracy']:.1%}; the model's own preference for the chosen "
            f"answer {before['logprob_accuracy']:.1%} before, {after['logprob_accuracy']:.1%} after"
        ]
        for e in evaluation.outputs["responses"][:3]:
            lines.append(f"\n>> {e['instruction']}\nreference: {e['reference_response']!r}\n"
                         f"tuned:     {e['policy_response']!r}")  # fmt: skip
        return "\n".join(lines)


def main(params_path: str = "params.yaml") -> dict:
    return DPOStage().run(params_path)


if __name__ == "__main__":
    run_main("finetune_dpo", main, doc=__doc__)
