"""Stage prepare_text: split the pretraining corpus by characters, tokenize to uint16 files.

Reads params `data`, `train.max_length`, `train.stride` and the corpus: each `data.corpus` entry
is a source's folder `data/raw/NAME/` (the download stage's output), a URL (fetched to a
temporary folder; DVC cannot see when its bytes change) or a local path (not a DVC dependency:
list it under this stage's deps in dvc.yaml). Writes `data/tokens/{train,val}.bin` and
`metrics/prepare_text.json`.
"""

import tempfile
from pathlib import Path

from llm.corpus import tokenize_corpus
from llm.data import TokenWindowDataset, read_tokens
from llm.errors import LLMError, run_main
from llm.io import write_json
from llm.pipeline.download import fetch, source_file, url_file_name
from llm.pipeline.params import load_params
from llm.pipeline.sources import is_location

RAW = Path("data/raw")
TOKENS = Path("data/tokens")
METRICS = Path("metrics/prepare_text.json")


def corpus_files(params, scratch: Path) -> list[Path]:
    files = []
    for i, entry in enumerate(params.data.corpus):
        if not is_location(entry):
            files.append(source_file(RAW / entry, f"data.corpus entry {entry!r}"))
        else:  # a user's own URL or path, copied as it is (no sha256 to check)
            files.append(fetch(entry, None, scratch / str(i) / (url_file_name(entry) or "corpus")))
    return files


def main(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    with tempfile.TemporaryDirectory(prefix="corpus-") as scratch:
        stats = tokenize_corpus(corpus_files(params, Path(scratch)), params.data.train_ratio, TOKENS)
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
    print(", ".join(f"{k} {v:,}" for k, v in stats.items()))
    metrics = {split: {k: stats[f"{split}_{k}"] for k in ("chars", "tokens", "windows")} for split in ("train", "val")}
    write_json(METRICS, metrics)
    return metrics


if __name__ == "__main__":
    run_main("prepare_text", main, doc=__doc__)
