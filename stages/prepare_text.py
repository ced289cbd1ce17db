"""Stage prepare_text: fetch the pretraining corpus, split it by characters, tokenize to uint16 files.

Reads params `sources`, `data`, `train.max_length`, `train.stride`; writes `data/raw/` (verified
downloads), `data/tokens/{train,val}.bin` and `metrics/prepare_text.json`.
"""

from pathlib import Path

from llm.corpus import tokenize_corpus
from llm.data import TokenWindowDataset, read_tokens
from llm.download import fetch
from llm.errors import LLMError, run_main
from llm.io import write_json
from llm.params import load_params

RAW = Path("data/raw")
TOKENS = Path("data/tokens")
METRICS = Path("metrics/prepare_text.json")


def corpus_files(params) -> list[Path]:
    files = []
    for entry in params.data.corpus:
        if entry in params.sources:
            src = params.sources[entry]
            url, sha = src.url, src.sha256
        else:
            url, sha = entry, None  # a user's own URL or path
        name = url.rstrip("/").rsplit("/", 1)[-1]
        files.append(fetch(url, sha, RAW / name))
    return files


def main(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    files = corpus_files(params)
    stats = tokenize_corpus(files, params.data.train_ratio, TOKENS)
    t = params.train
    for split in ("train", "val"):
        n_windows = len(TokenWindowDataset(read_tokens(TOKENS / f"{split}.bin"), t.max_length, t.stride))
        if n_windows == 0:
            raise LLMError(
                f"the {split} split has {stats[f'{split}_tokens']} tokens: too few for one window of "
                f"train.max_length + 1 = {t.max_length + 1} tokens; use a longer data.corpus, another "
                f"data.train_ratio or a smaller train.max_length"
            )
        stats[f"{split}_windows"] = n_windows
    write_json(METRICS, stats)
    print(", ".join(f"{k} {v:,}" for k, v in stats.items()))
    return stats


if __name__ == "__main__":
    run_main("prepare_text", main)
