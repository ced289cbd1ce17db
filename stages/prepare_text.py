"""Stage prepare_text: split the pretraining corpus by characters, tokenize to uint16 files.

Reads params `data`, `train.max_length`, `train.stride` and the corpus: each `data.corpus` entry
is a source's folder `data/raw/NAME/` (the download stage's output), a URL (fetched to a
temporary folder; DVC cannot see when its bytes change) or a local file, directory or glob
pattern (`llm.corpus.expand_corpus`; read in place, not a DVC dependency: list the file or folder
under this stage's deps in dvc.yaml). Writes `data/tokens/{train,val}.bin` and
`metrics/prepare_text.json`.
"""

import tempfile
from pathlib import Path

from llm.corpus import expand_corpus, tokenize_corpus
from llm.data import min_split_tokens, split_windows
from llm.errors import LLMError, run_main
from llm.files import write_json
from llm.pipeline.download import fetch, source_file, url_file_name
from llm.pipeline.params import load_params
from llm.pipeline.sources import is_local, is_location

RAW = Path("data/raw")
TOKENS = Path("data/tokens")
METRICS = Path("metrics/prepare_text.json")
SPLIT_NAMES = {"train": "training", "val": "validation"}


def corpus_files(params, scratch: Path) -> tuple[list[Path], list[str]]:
    """The corpus's files in order, and the `data.corpus` entry each comes from (for errors)."""
    files, names = [], []
    for i, entry in enumerate(params.data.corpus):
        what = f"data.corpus entry {entry!r}"
        if not is_location(entry):
            found = [source_file(RAW / entry, what)]
        elif is_local(entry):  # a user's own file, directory or glob, read where it is
            found = expand_corpus(entry, what)
        else:  # a user's own URL, fetched as it is (no sha256 to check)
            found = [fetch(entry, None, scratch / str(i) / (url_file_name(entry) or "corpus"))]
        files += found
        names += [what] * len(found)
    return files, names


def split_check(params):
    """Stop as soon as a split is tokenized if it cannot hold one window: before any file is replaced."""
    ratio, need = params.data.train_ratio, min_split_tokens(params.train.max_length)

    def check(split: str, stats: dict) -> None:
        tokens = stats[f"{split}_tokens"]
        if tokens < need:
            total = stats["train_chars"] + stats["val_chars"]
            raise LLMError(
                f"data.train_ratio {ratio} gives the {SPLIT_NAMES[split]} split {stats[f'{split}_chars']:,} of the "
                f"corpus's {total:,} characters, {tokens:,} tokens: too few for one window of train.max_length + 1 "
                f"= {need} tokens; use another data.train_ratio, a longer data.corpus or a smaller train.max_length"
            )

    return check


def main(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    with tempfile.TemporaryDirectory(prefix="corpus-") as scratch:
        files, names = corpus_files(params, Path(scratch))
        stats = tokenize_corpus(files, params.data.train_ratio, TOKENS, names=names, check=split_check(params))
    t = params.train
    train_set, val_set = split_windows(TOKENS, t.max_length, t.stride)
    stats.update(train_windows=len(train_set), val_windows=len(val_set))
    print(", ".join(f"{k} {v:,}" for k, v in stats.items()))
    metrics = {split: {k: stats[f"{split}_{k}"] for k in ("chars", "tokens", "windows")} for split in ("train", "val")}
    write_json(METRICS, metrics)
    return metrics


if __name__ == "__main__":
    run_main("prepare_text", main, doc=__doc__)
