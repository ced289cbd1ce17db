"""The finetune_instruct stage's answers to its test set: one entry at a time against `answer_test_set`'s batches.

"Before" is the stage's loop before batching (`generate` on each entry's prompt in turn), "after" is
`answer_test_set` (batches of `--batch-size`), interleaved in `--rounds` rounds on a reproduced pipeline
(`dvc repro` in a copy of the repository: its models/instruct, data/raw/instructions and
data/instruct/responses.json). Each side's answers are written the stage's way (`llm.files.write_json`)
and compared byte for byte with the stage's responses.json; then `answer_test_set` once more at each of
`--other-batch-sizes`, compared the same way.

    .venv/bin/python -m bench.bench_instruct_answers /path/to/reproduced/repo --threads 1

Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import torch

from bench._common import machine_lines, markdown_table, use_mirrored_tiktoken, write_report
from llm.checkpoint import load_checkpoint
from llm.files import write_json
from llm.generate import generate
from llm.instruct import answer_test_set, extract_response, format_input, load_instructions, split_instructions
from llm.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

NEW_TOKENS, EOS = 64, 50256  # the stage's defaults (params.yaml finetune_instruct)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repro", type=Path, help="a repository copy after dvc repro")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--other-batch-sizes", default="1,4,64")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "instruct_answers.md"))
    args = p.parse_args(argv)
    use_mirrored_tiktoken()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.repro / "models/instruct").eval()
    data = load_instructions(args.repro / "data/raw/instructions/instruction-data.json")
    _, test, _ = split_instructions(data, 0.85, 0.1)
    committed = (args.repro / "data/instruct/responses.json").read_bytes()
    context, tok = model.cfg["context_length"], get_tokenizer()

    def before() -> list[str]:
        out = []
        for entry in test:
            prompt = format_input(entry, "alpaca")
            ids = text_to_token_ids(prompt, tok)[:, -context:]
            new = generate(model, ids, NEW_TOKENS, context, eos_id=EOS)[:, ids.shape[1] :]
            out.append(extract_response(prompt + token_ids_to_text(new, tok), prompt, "alpaca"))
        return out

    def after(batch_size: int = args.batch_size) -> list[str]:
        return answer_test_set(model, test, "alpaca", NEW_TOKENS, EOS, batch_size=batch_size)

    def same_file(answers: list[str]) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            entries = [{**e, "model_response": a} for e, a in zip(test, answers, strict=True)]
            path = write_json(Path(tmp) / "responses.json", entries)
            return path.read_bytes() == committed

    sides = {"one entry at a time (generate)": before, f"answer_test_set, batches of {args.batch_size}": after}
    times: dict[str, list[float]] = {name: [] for name in sides}
    equal: dict[str, bool] = {name: True for name in sides}
    for r in range(args.rounds):
        for name, fn in sides.items() if r % 2 == 0 else reversed(sides.items()):
            t = time.perf_counter()
            answers = fn()
            times[name].append(time.perf_counter() - t)
            equal[name] &= same_file(answers)
            print(f"round {r + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    rows = [[name, f"{min(v):.1f}–{max(v):.1f}", f"{len(v)}", "yes" if equal[name] else "NO"]
            for name, v in times.items()]  # fmt: skip
    for bs in [int(b) for b in args.other_batch_sizes.split(",") if b]:
        t = time.perf_counter()
        ok = same_file(after(bs))
        rows.append([f"answer_test_set, batches of {bs}", f"{time.perf_counter() - t:.1f}", "1", "yes" if ok else "NO"])
        print(rows[-1], flush=True)
    md5 = hashlib.md5(committed).hexdigest()
    text = "\n".join([
        f"# The finetune_instruct stage's answers: {len(test)} test entries, {NEW_TOKENS} greedy tokens at most",
        "",
        *machine_lines(args.threads),
        f"- model: {args.repro}/models/instruct; the stage's data/instruct/responses.json has md5 {md5}",
        f"- {args.rounds} interleaved rounds of the first two rows, then one run of each other batch size",
        "- same file: the answers, written the stage's way, are that responses.json byte for byte",
        "",
        markdown_table(["answering", "seconds", "runs", "same file"], rows),
        "",
    ])  # fmt: skip
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
