"""Stage finetune_instruct: the book's chapter-7 instruction finetuning, responses and evaluation.

Reads params `finetune_instruct`, the download `data/raw/instructions/` (or the JSON file that
`finetune_instruct.data` names) and the starting model; writes `models/instruct/`,
`data/instruct/responses.json` (the book's instruction-data-with-response.json), the loss curve
(rewritten at every evaluation), `metrics/finetune_instruct.json` and the wall times in
`timings/finetune_instruct.json`. A metric that cannot be computed (the response loss when no
response token fits the context) is written as null, with the reason in the log.
"""

import math
import time
from pathlib import Path

from torch.utils.data import DataLoader

from llm.checkpoint import load_checkpoint, save_checkpoint
from llm.errors import LLMError, run_main
from llm.generate import generate
from llm.instruct import (
    InstructionDataset,
    extract_response,
    format_input,
    load_instructions,
    make_collate,
    response_metrics,
    split_instructions,
)
from llm.io import write_csv, write_json
from llm.judge import judge_responses
from llm.losses import calc_loss_loader, perplexity
from llm.pipeline.download import source_file
from llm.pipeline.params import init_source, is_location, load_params
from llm.progress import progress_bar
from llm.runtime import keep_freed_memory, select_device, set_seed
from llm.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from llm.trainer import Trainer

RAW = Path("data/raw")
MODEL_DIR = Path("models/instruct")
RESPONSES = Path("data/instruct/responses.json")
CURVE = Path("metrics/curves/finetune_instruct.csv")
METRICS = Path("metrics/finetune_instruct.json")
TIMINGS = Path("timings/finetune_instruct.json")
STATE = Path("models/resume/finetune_instruct.pt")  # Ctrl-C/SIGTERM saves here; a rerun resumes


def data_file(params) -> Path:
    f = params.finetune_instruct
    if not is_location(f.data):
        return source_file(RAW / f.data, f"finetune_instruct.data {f.data!r}")
    path = Path(f.data)
    if not path.is_file():
        raise LLMError(f"finetune_instruct.data {f.data!r} is neither a name in sources.yaml nor an existing file")
    return path


def main(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    f = params.finetune_instruct
    if f is None:
        raise LLMError(f"{params_path} has no finetune_instruct section")
    data = load_instructions(data_file(params))
    train_data, test_data, val_data = split_instructions(data, f.train_frac, f.test_frac)
    device = select_device(f.device)
    keep_freed_memory()  # ~20% faster steps on CPU: see llm/runtime.py
    init = init_source(f.init)
    model = load_checkpoint(init)
    context = model.cfg["context_length"]
    max_len = min(f.allowed_max_length or context, context)
    tokenizer = get_tokenizer()
    sets = {
        name: InstructionDataset(split, tokenizer, f.prompt_style, f.mask_prompt)
        for name, split in (("train", train_data), ("val", val_data), ("test", test_data))
    }
    collate = make_collate(max_len)

    set_seed(f.seed)  # the book: torch.manual_seed(123) before the loaders
    model.train()
    run_id = {"params": f.__dict__, "init": str(init), "examples": len(train_data)}
    trainer = Trainer(
        model,
        sets["train"],
        sets["val"],
        f,
        collate_fn=collate,
        on_record=lambda h: write_csv(CURVE, h.rows()),
        state_path=STATE,
        run_id=run_id,
    )
    started = time.perf_counter()
    history = trainer.fit()
    train_seconds = time.perf_counter() - started

    metrics = {}
    for name, ds in sets.items():
        loader = DataLoader(ds, batch_size=f.batch_size, shuffle=False, collate_fn=collate)
        metrics[name] = {"loss": calc_loss_loader(loader, model, device, precision=f.precision)}
    # the test loss on the response tokens only: what the model is asked to produce
    masked = InstructionDataset(test_data, tokenizer, f.prompt_style, mask_prompt=True)
    loader = DataLoader(masked, batch_size=f.batch_size, shuffle=False, collate_fn=collate)
    response_loss = calc_loss_loader(loader, model, device, precision=f.precision)
    metrics["test"].update(response_loss=response_loss, response_perplexity=perplexity(response_loss))
    if not math.isfinite(response_loss):  # written as null; a gate on it fails
        print(f"test response loss: null: no response token of the test set fits in {max_len} tokens")

    model.eval()
    entries = []
    gen_started = time.perf_counter()
    for entry in progress_bar(test_data, desc="responses", unit="entry"):
        prompt = format_input(entry, f.prompt_style)
        ids = text_to_token_ids(prompt, tokenizer)[:, -context:].to(device)
        out = generate(model, ids, f.max_new_tokens, context, eos_id=f.eos_id)
        # decode only the new tokens: a prompt longer than the context was cut on the left
        text = prompt + token_ids_to_text(out[:, ids.shape[1] :], tokenizer)
        entries.append({**entry, "model_response": extract_response(text, prompt, f.prompt_style)})
    generate_seconds = time.perf_counter() - gen_started
    metrics["test"].update(response_metrics(entries))
    if f.judge == "ollama":
        metrics["test"].update(judge_responses(entries, f.judge_model, f.judge_url, f.seed))
    metrics.update({"steps": history.steps, "tokens_seen": history.total_tokens})
    timings = {
        "train_seconds": train_seconds,
        "tokens_per_sec": history.total_tokens / history.train_seconds if history.train_seconds else None,
        "generate_seconds": generate_seconds,
        "device": str(device),
    }
    save_checkpoint(model, MODEL_DIR, extra={"instruct": {"prompt_style": f.prompt_style, "init": str(init)}})
    write_json(RESPONSES, entries)
    write_csv(CURVE, history.rows())
    write_json(METRICS, metrics)
    write_json(TIMINGS, timings)
    print(
        f"val loss {metrics['val']['loss']:.3f}, test response loss {response_loss:.3f}, "
        f"ROUGE-L {metrics['test']['rouge_l']:.3f}, exact match {metrics['test']['exact_match']:.1%}"
    )
    for e in entries[:3]:
        print(f"\n>> {e['instruction']}\n{e['output']!r}\n-> {e['model_response']!r}")
    return metrics


if __name__ == "__main__":
    run_main("finetune_instruct", main, doc=__doc__)
