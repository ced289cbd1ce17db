"""Stage finetune_instruct: the book's chapter-7 instruction finetuning, responses and evaluation.

Reads params `finetune_instruct`, `runtime`, the download `data/raw/instructions/` (or the JSON file that
`finetune_instruct.data` names) and the starting model; writes `models/instruct/`,
`data/instruct/responses.json` (the book's instruction-data-with-response.json), the loss curve
(rewritten at every evaluation), `metrics/finetune_instruct.json` and the wall times in
`timings/finetune_instruct.json`. A metric that cannot be computed (the response loss when no
response token fits the context) is written as null, with the reason in the log.
"""

import math
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from llm.bounds import check_split_sizes
from llm.checkpoint import save_checkpoint
from llm.errors import run_main
from llm.files import write_json
from llm.instruct import (
    InstructionDataset,
    answer_test_set,
    load_instructions,
    make_collate,
    response_metrics,
    split_instructions,
)
from llm.judge import judge_responses
from llm.losses import calc_loss_loader, perplexity
from llm.pipeline.finetune import Evaluation, FinetuneStage, Outputs, TaskData
from llm.pipeline.sources import data_file
from llm.tokenizer import EOT_ID, check_token_ids

RAW = Path("data/raw")
RESPONSES = Path("data/instruct/responses.json")
OUTPUTS = Outputs(
    model_dir=Path("models/instruct"),
    curve=Path("metrics/curves/finetune_instruct.csv"),
    metrics=Path("metrics/finetune_instruct.json"),
    timings=Path("timings/finetune_instruct.json"),
    state=Path("models/resume/finetune_instruct.pt"),  # Ctrl-C/SIGTERM saves here; a rerun resumes
)


@dataclass(kw_only=True)
class InstructData(TaskData):
    """The datasets ("train", "val", "test") and what the evaluation reads: the test entries, the
    tokenizer, the model's context and the longest batch (`allowed_max_length`, at most the context)."""

    test_data: list[dict]
    tokenizer: Any
    context: int
    max_len: int


class InstructStage(FinetuneStage):
    section = "finetune_instruct"
    outputs = OUTPUTS

    def load_data(self, f) -> dict[str, list[dict]]:
        path = data_file(f.data, f"finetune_instruct.data {f.data!r}", RAW)
        data = load_instructions(path, what="finetune_instruct.data")
        train, test, val = split_instructions(data, f.train_frac, f.test_frac)
        splits = {"train": train, "val": val, "test": test}
        sizes = {"train": len(train), "test": len(test), "validation": len(val)}
        fractions = {"train_frac": f.train_frac, "test_frac": f.test_frac}
        check_split_sizes(self.section, fractions, sizes, f"{len(data):,} entries of {path}", f.batch_size)
        return splits

    def datasets(self, f, splits, model, tokenizer) -> InstructData:
        context = model.cfg["context_length"]
        max_len = min(f.allowed_max_length or context, context)
        sets = {
            name: InstructionDataset(splits[name], tokenizer, f.prompt_style, f.mask_prompt)
            for name in ("train", "val", "test")
        }
        for name, ds in sets.items():  # GPT-2 ids and the pad 50256: a model with a smaller vocab_size stops here
            ids = [EOT_ID, *chain.from_iterable(ds.encoded_texts)]
            check_token_ids(ids, model.cfg["vocab_size"], f"finetune_instruct: the {name} split")
        return InstructData(sets=sets, collate_fn=make_collate(max_len), test_data=splits["test"], tokenizer=tokenizer,
                            context=context, max_len=max_len)  # fmt: skip

    def evaluate(self, f, task, model, history, device) -> Evaluation:
        collate, tokenizer = task.collate_fn, task.tokenizer
        metrics = {}
        for name, ds in task.sets.items():
            loader = DataLoader(ds, batch_size=f.batch_size, shuffle=False, collate_fn=collate)
            metrics[name] = {"loss": calc_loss_loader(loader, model, device, precision=f.precision)}
        # the test loss on the response tokens only: what the model is asked to produce
        masked = InstructionDataset(task.test_data, tokenizer, f.prompt_style, mask_prompt=True)
        loader = DataLoader(masked, batch_size=f.batch_size, shuffle=False, collate_fn=collate)
        response_loss = calc_loss_loader(loader, model, device, precision=f.precision)
        metrics["test"].update(response_loss=response_loss, response_perplexity=perplexity(response_loss))
        if not math.isfinite(response_loss):  # written as null; a gate on it fails
            print(f"test response loss: null: no response token of the test set fits in {task.max_len} tokens")

        model.eval()
        started = time.perf_counter()
        answers = answer_test_set(
            model, task.test_data, f.prompt_style, f.max_new_tokens, f.eos_id, progress="responses"
        )
        entries = [{**entry, "model_response": answer} for entry, answer in zip(task.test_data, answers, strict=True)]
        generate_seconds = time.perf_counter() - started
        metrics["test"].update(response_metrics(entries))
        if f.judge == "ollama":
            metrics["test"].update(judge_responses(entries, f.judge_model, f.judge_url, f.seed))
        metrics.update({"steps": history.steps, "tokens_seen": history.total_tokens})
        timings = {
            "tokens_per_sec": history.total_tokens / history.train_seconds if history.train_seconds else None,
            "generate_seconds": generate_seconds,
        }
        return Evaluation(metrics, timings, {"responses": entries})

    def save(self, f, task, model, init, evaluation):
        meta = {"instruct": {"prompt_style": f.prompt_style, "init": init}, **self.lora_meta(f)}
        save_checkpoint(model, self.outputs.model_dir, extra=meta)
        write_json(RESPONSES, evaluation.outputs["responses"])

    def summary(self, evaluation, train_seconds):
        metrics, entries = evaluation.metrics, evaluation.outputs["responses"]
        lines = [
            f"val loss {metrics['val']['loss']:.3f}, test response loss {metrics['test']['response_loss']:.3f}, "
            f"ROUGE-L {metrics['test']['rouge_l']:.3f}, exact match {metrics['test']['exact_match']:.1%}"
        ]
        lines += [f"\n>> {e['instruction']}\n{e['output']!r}\n-> {e['model_response']!r}" for e in entries[:3]]
        return "\n".join(lines)


def main(params_path: str = "params.yaml") -> dict:
    return InstructStage().run(params_path)


if __name__ == "__main__":
    run_main("finetune_instruct", main, doc=__doc__)
