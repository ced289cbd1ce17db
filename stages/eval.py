"""Stage eval: loss and perplexity of the pretrained model on the whole splits, plus samples.

Reads params `train.batch_size`, `train.max_length`, `train.stride`, `train.precision`,
`train.device`, `eval` and `runtime`; writes `metrics/eval.json` and `data/eval/samples.json`.
"""

from pathlib import Path

import torch

from llm.checkpoint import load_checkpoint
from llm.data import TokenWindowDataset, read_tokens
from llm.errors import run_main
from llm.files import write_json
from llm.generate import generate_batch
from llm.losses import calc_loss_loader, perplexity
from llm.pipeline.params import init_source, load_params
from llm.runtime import select_device, set_threads
from llm.tokenizer import encode, get_tokenizer, token_ids_to_text

TOKENS = Path("data/tokens")
SAMPLES = Path("data/eval/samples.json")
METRICS = Path("metrics/eval.json")


def main(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    set_threads(params.runtime.threads)
    t, e = params.train, params.eval
    device = select_device(t.device)
    model = load_checkpoint(init_source(e.init), map_location=device)
    metrics = {}
    for split in ("train", "val"):
        ids = read_tokens(TOKENS / f"{split}.bin", model.cfg["vocab_size"])  # ids the model can embed
        ds = TokenWindowDataset(ids, t.max_length, t.stride)
        loader = torch.utils.data.DataLoader(ds, batch_size=t.batch_size, shuffle=False, drop_last=False)
        loss = calc_loss_loader(loader, model, device, e.eval_batches, t.precision)
        metrics[split] = {"loss": loss, "perplexity": perplexity(loss), "windows": len(ds)}

    tokenizer = get_tokenizer()
    context = model.cfg["context_length"]
    prompts = [encode(prompt, tokenizer) for prompt in e.prompts]
    # every prompt at once, each answered as `generate` answers it alone (the sampled ones each with a generator
    # seeded e.seed, as `generate(..., seed=e.seed)` seeds its own)
    greedy = generate_batch(model, prompts, e.max_new_tokens, context)
    sampled = generate_batch(model, prompts, e.max_new_tokens, context, temperature=e.temperature, top_k=e.top_k,
                             seed=e.seed)  # fmt: skip
    samples = []
    for prompt, ids, g, s in zip(e.prompts, prompts, greedy, sampled, strict=True):
        samples.append(
            {
                "model": e.init,
                "prompt": prompt,
                "greedy": token_ids_to_text(torch.tensor([ids + g]), tokenizer),
                "sampled": token_ids_to_text(torch.tensor([ids + s]), tokenizer),
                "temperature": e.temperature,
                "top_k": e.top_k,
                "seed": e.seed,
            }
        )
        print(f"greedy:  {samples[-1]['greedy']!r}\nsampled: {samples[-1]['sampled']!r}")
    write_json(SAMPLES, samples)
    write_json(METRICS, metrics)
    print(
        f"val loss {metrics['val']['loss']:.3f} (perplexity {metrics['val']['perplexity']:.1f}), "
        f"train loss {metrics['train']['loss']:.3f}"
    )
    return metrics


if __name__ == "__main__":
    run_main("eval", main, doc=__doc__)
