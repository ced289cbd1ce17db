"""Stage inputs that cannot make a run: each stops the stage before any work with one line naming
the settings and the sizes, and leaves the previous outputs as they were.

- prepare_text: a split too small for one window (data.train_ratio near 0 or 1), a corpus file
  that is not UTF-8;
- finetune_instruct / finetune_spam: a split that comes out empty, or a training split smaller
  than one batch, stops in `load_data`, before the starting model is even loaded;
- pretrain, eval, finetune_spam, finetune_instruct: a token id the model cannot embed (a
  `model.vocab_size` below GPT-2's 50257) stops once the data and the model are loaded, naming the file
  or split (the model itself does not check ids: `llm.tokenizer.check_token_ids`).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llm.bounds import check_split_sizes
from llm.checkpoint import save_checkpoint
from llm.errors import ConfigError, LLMError
from llm.model import GPTModel
from llm.pipeline.params import parse_params
from llm.tokenizer import get_tokenizer
from stages import eval as stage_eval
from stages import finetune_instruct, finetune_spam, prepare_text, pretrain
from tests.conftest import ROOT, committed_yaml, tiny_cfg

ENTRY = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by Sam.", "output": "Sam baked the cake."}
WORDS = "Every effort moves you toward the picture, said Gisburn, and the studio was quiet again.\n"


def write_params(path, **sections):
    raw = committed_yaml("params.yaml")
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(json.dumps(raw))  # JSON is YAML
    return parse_params(raw)


def run_stage(module: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"stages.{module}"], cwd=cwd, env=env, capture_output=True, text=True)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- prepare_text ----------------------------------------------------------------------------------
@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.txt").write_text(WORDS * 120, encoding="utf-8")  # 10,680 characters, 2,520 tokens
    return tmp_path


def test_prepare_text_writes_both_splits(corpus_dir):
    write_params(corpus_dir / "params.yaml", data={"corpus": ["my.txt"], "train_ratio": 0.5})
    metrics = prepare_text.main()
    assert metrics["train"]["windows"] >= 1 and metrics["val"]["windows"] >= 1
    assert (corpus_dir / "data/tokens/train.bin").stat().st_size == 2 * metrics["train"]["tokens"]
    assert (corpus_dir / "data/tokens/val.bin").stat().st_size == 2 * metrics["val"]["tokens"]


@pytest.mark.parametrize(
    "ratio, message",
    [
        (1e-9, "data.train_ratio 1e-09 gives the training split 0 of the corpus's 10,680 characters, 0 tokens: "
         "too few for one window of train.max_length + 1 = 257 tokens"),
        (0.02, "data.train_ratio 0.02 gives the training split 213 of the corpus's 10,680 characters, 49 tokens: "),
        (0.999, "data.train_ratio 0.999 gives the validation split 11 of the corpus's 10,680 characters, "),
        (1 - 1e-12, "gives the validation split 1 of the corpus's 10,680 characters, 1 tokens"),
    ],
)  # fmt: skip
def test_a_split_too_small_for_one_window_stops_prepare_text_and_keeps_the_old_files(corpus_dir, ratio, message):
    write_params(corpus_dir / "params.yaml", data={"corpus": ["my.txt"], "train_ratio": 0.5})
    prepare_text.main()
    before = snapshot(corpus_dir / "data") | snapshot(corpus_dir / "metrics")
    write_params(corpus_dir / "params.yaml", data={"corpus": ["my.txt"], "train_ratio": ratio})
    with pytest.raises(LLMError) as err:
        prepare_text.main()
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    # nothing half-written: the previous run's pair of token files and its metrics, no temporary files
    assert snapshot(corpus_dir / "data") | snapshot(corpus_dir / "metrics") == before


def test_prepare_text_with_a_corpus_that_is_not_utf8(corpus_dir):
    (corpus_dir / "latin1.txt").write_bytes(WORDS.encode() * 3 + "café\n".encode("latin-1"))
    write_params(corpus_dir / "params.yaml", data={"corpus": ["my.txt", "latin1.txt"]})
    with pytest.raises(LLMError) as err:
        prepare_text.main()
    message = str(err.value)
    assert message.startswith("data.corpus entry 'latin1.txt' (") and "\n" not in message
    assert message.endswith(f"latin1.txt) is not UTF-8 text: byte b'\\xe9' at offset {len(WORDS) * 3 + 3} (line 4); "
                            "save it as UTF-8")  # fmt: skip
    assert snapshot(corpus_dir / "data") == {}


def test_prepare_text_error_is_one_line_on_stderr(corpus_dir):
    write_params(corpus_dir / "params.yaml", data={"corpus": ["my.txt"], "train_ratio": 1e-9})
    proc = run_stage("prepare_text", corpus_dir)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("prepare_text: error: data.train_ratio 1e-09 gives")
    assert snapshot(corpus_dir / "data") == {} and not (corpus_dir / "metrics").exists()


# --- finetune_instruct -----------------------------------------------------------------------------
def instructions(folder, n: int, name: str = "tiny.json"):
    (folder / name).write_text(json.dumps([{**ENTRY, "instruction": f"Task {i}."} for i in range(n)]))
    return name


@pytest.mark.parametrize(
    "n, changes, message",
    [
        (5, {}, "finetune_instruct.train_frac 0.85 and finetune_instruct.test_frac 0.1 split the 5 entries of "
         "tiny.json into 4 train, 0 test, 1 validation: the test split is empty; use more data or other fractions"),
        (2, {}, "split the 2 entries of tiny.json into 1 train, 0 test, 1 validation: the test split is empty"),
        (1, {}, "into 0 train, 0 test, 1 validation: the train and test splits are empty"),
        (10, {"train_frac": 0.05, "test_frac": 0.5}, "finetune_instruct.train_frac 0.05 and "
         "finetune_instruct.test_frac 0.5 split the 10 entries of tiny.json into 0 train, 5 test, 5 validation: "
         "the train split is empty"),
        (12, {"batch_size": 16}, "into 10 train, 1 test, 1 validation: the train split is smaller than one batch of "
         "finetune_instruct.batch_size = 16"),
    ],
)  # fmt: skip
def test_instruct_splits_that_cannot_train_or_evaluate_stop_in_load_data(tmp_path, monkeypatch, n, changes, message):
    monkeypatch.chdir(tmp_path)
    f = write_params(tmp_path / "params.yaml", finetune_instruct={"data": instructions(tmp_path, n), **changes})
    with pytest.raises(LLMError) as err:
        finetune_instruct.InstructStage().load_data(f.finetune_instruct)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_instruct_splits_that_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = write_params(tmp_path / "params.yaml", finetune_instruct={"data": instructions(tmp_path, 20)})
    splits = finetune_instruct.InstructStage().load_data(f.finetune_instruct)
    assert (len(splits["train"]), len(splits["test"]), len(splits["val"])) == (17, 2, 1)


def test_instruct_stage_stops_before_loading_a_model(tmp_path):
    """No models/pretrain here: the stage must stop on the data, with one line and status 2."""
    write_params(tmp_path / "params.yaml", finetune_instruct={"data": instructions(tmp_path, 5)})
    proc = run_stage("finetune_instruct", tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("finetune_instruct: error: finetune_instruct.train_frac 0.85 and")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "tiny.json"]


def test_instruct_data_that_is_not_utf8(tmp_path, monkeypatch):
    """load_instructions reads the file: its error names the file and where it stops being UTF-8."""
    monkeypatch.chdir(tmp_path)
    entries = json.dumps([{**ENTRY, "output": "Café."}] * 20, ensure_ascii=False)
    (tmp_path / "latin1.json").write_bytes(entries.encode("latin-1"))
    f = write_params(tmp_path / "params.yaml", finetune_instruct={"data": "latin1.json"})
    with pytest.raises(LLMError) as err:
        finetune_instruct.InstructStage().load_data(f.finetune_instruct)
    offset = entries.encode("latin-1").index(b"\xe9")
    message = str(err.value)
    assert "latin1.json" in message and "not UTF-8" in message and f"offset {offset}" in message
    assert "\n" not in message


# --- finetune_spam ---------------------------------------------------------------------------------
def sms(folder, spam: int, ham: int):
    raw = folder / "data/raw/sms_spam"
    raw.mkdir(parents=True)
    lines = [f"spam\tWIN a prize {i} now" for i in range(spam)] + [f"ham\tsee you at {i}" for i in range(ham)]
    (raw / "SMSSpamCollection").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "spam, ham, changes, message",
    [
        (4, 4, {}, "finetune_spam.train_frac 0.7 and finetune_spam.validation_frac 0.1 split the 8 messages of "
         "data/raw/sms_spam/SMSSpamCollection (after finetune_spam.balance) into 5 train, 0 validation, 3 test: "
         "the validation split is empty; use more data or other fractions"),
        (4, 100, {}, "split the 8 messages of data/raw/sms_spam/SMSSpamCollection (after finetune_spam.balance) "
         "into 5 train, 0 validation, 3 test: the validation split is empty"),
        (4, 3, {"balance": False}, "split the 7 messages of data/raw/sms_spam/SMSSpamCollection into 4 train, "
         "0 validation, 3 test: the validation split is empty"),
        (0, 30, {}, "split the 0 messages of data/raw/sms_spam/SMSSpamCollection (after finetune_spam.balance) into "
         "0 train, 0 validation, 0 test: the train, validation and test splits are empty"),
        (30, 30, {"batch_size": 64}, "into 42 train, 6 validation, 12 test: the train split is smaller than one "
         "batch of finetune_spam.batch_size = 64"),
    ],
)  # fmt: skip
def test_spam_splits_that_cannot_train_or_evaluate_stop_before_writing(tmp_path, monkeypatch, spam, ham, changes,
                                                                         message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    sms(tmp_path, spam, ham)
    f = write_params(tmp_path / "params.yaml", finetune_spam=changes).finetune_spam
    with pytest.raises(LLMError) as err:
        finetune_spam.SpamStage().load_data(f)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "data/spam").exists()  # the splits are written only once they can be used


@pytest.mark.parametrize(
    "spam, ham, changes, sizes",
    [
        (10, 10, {}, (14, 2, 4)),
        (10, 10, {"train_frac": 0.9, "validation_frac": 0.05}, (18, 1, 1)),
        (10, 3, {"balance": False, "batch_size": 2}, (9, 1, 3)),
    ],
)
def test_spam_splits_that_work(tmp_path, monkeypatch, spam, ham, changes, sizes):
    monkeypatch.chdir(tmp_path)
    sms(tmp_path, spam, ham)
    splits = finetune_spam.SpamStage().load_data(
        write_params(tmp_path / "params.yaml", finetune_spam=changes).finetune_spam
    )
    assert tuple(len(splits[name]) for name in ("train", "validation", "test")) == sizes


def test_spam_stage_stops_before_loading_a_model(tmp_path):
    sms(tmp_path, 4, 4)
    write_params(tmp_path / "params.yaml")
    proc = run_stage("finetune_spam", tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "the validation split is empty" in proc.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "data/raw/sms_spam/SMSSpamCollection",
        "params.yaml",
    ]


# --- the check itself -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sizes, batch_size, need",
    [
        ({"train": 4, "test": 0, "validation": 1}, 1, "the test split is empty"),
        ({"train": 0, "test": 0, "validation": 1}, 1, "the train and test splits are empty"),
        ({"train": 0, "validation": 0, "test": 0}, 1, "the train, validation and test splits are empty"),
        ({"train": 3, "validation": 1, "test": 1}, 4, "the train split is smaller than one batch of s.batch_size = 4"),
    ],
)
def test_check_splits_names_the_fractions_and_every_size(sizes, batch_size, need):
    with pytest.raises(ConfigError) as err:
        check_split_sizes("s", {"a_frac": 0.5, "b_frac": 0.25}, sizes, "N things of f", batch_size)
    got = ", ".join(f"{n} {name}" for name, n in sizes.items())
    assert str(err.value) == f"s.a_frac 0.5 and s.b_frac 0.25 split the N things of f into {got}: {need}; use more " \
        "data or other fractions"  # fmt: skip
    check_split_sizes("s", {"a_frac": 0.5}, {"train": batch_size, "test": 1, "validation": 1}, "x", batch_size)


# --- token ids the model cannot embed (a model.vocab_size smaller than the tokenizer's) ---------------
SMALL = {"vocab_size": 97, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0}


def token_files(folder, bad_id: int):
    tokens = folder / "data/tokens"
    tokens.mkdir(parents=True)
    np.arange(40, dtype=np.uint16).tofile(tokens / "train.bin")
    np.array([1, 2, bad_id, 4] * 5, dtype=np.uint16).tofile(tokens / "val.bin")


def small_model():
    torch.manual_seed(0)
    return GPTModel({**tiny_cfg(), **SMALL})


def test_pretrain_stops_on_a_token_the_model_cannot_embed_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    token_files(tmp_path, 200)
    write_params(tmp_path / "params.yaml", model=SMALL, train={"max_length": 8, "stride": 8, "device": "cpu"})
    monkeypatch.setattr(pretrain, "keep_freed_memory", lambda: None)  # process-wide: not in the test process
    with pytest.raises(LLMError) as err:
        pretrain.main()
    message = "token file data/tokens/val.bin: token id 200 is outside the vocabulary [0, 97) of the model"
    assert str(err.value) == message
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "data/tokens/train.bin",
        "data/tokens/val.bin",
        "params.yaml",
    ]


def test_eval_stops_on_a_token_the_model_cannot_embed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    token_files(tmp_path, 97)
    save_checkpoint(small_model(), tmp_path / "models/pretrain")
    write_params(tmp_path / "params.yaml", train={"max_length": 8, "stride": 8, "device": "cpu"})
    with pytest.raises(LLMError, match=r"^token file data/tokens/val.bin: token id 97 is outside the vocabulary"):
        stage_eval.main()
    assert not (tmp_path / "metrics").exists()


def test_spam_datasets_a_model_cannot_embed_stop_before_training(tmp_path, monkeypatch):
    """GPT-2's ids, padded with 50256: a model with a smaller vocab_size stops when the datasets are built."""
    monkeypatch.chdir(tmp_path)
    sms(tmp_path, 10, 10)
    f = write_params(tmp_path / "params.yaml").finetune_spam
    stage = finetune_spam.SpamStage()
    splits = stage.load_data(f)
    with pytest.raises(LLMError, match=r"^finetune_spam: the train split: token id \d+ is outside the vocabulary"):
        stage.datasets(f, splits, small_model(), get_tokenizer())
    task = stage.datasets(f, splits, GPTModel(tiny_cfg(context_length=16)), get_tokenizer())  # GPT-2's vocabulary
    assert len(task.sets["train"]) == 14 and len(task.sets["val"]) == 2


def test_instruct_datasets_a_model_cannot_embed_stop_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = write_params(tmp_path / "params.yaml", finetune_instruct={"data": instructions(tmp_path, 20)})
    stage = finetune_instruct.InstructStage()
    splits = stage.load_data(f.finetune_instruct)
    with pytest.raises(LLMError, match=r"^finetune_instruct: the train split: token id \d+ is outside the vocabulary"):
        stage.datasets(f.finetune_instruct, splits, small_model(), get_tokenizer())
    model = GPTModel(tiny_cfg(vocab_size=50256))  # every id of the text, but not the pad <|endoftext|>
    with pytest.raises(LLMError, match=r"the train split: token id 50256 is outside the vocabulary \[0, 50256\)"):
        stage.datasets(f.finetune_instruct, splits, model, get_tokenizer())
    task = stage.datasets(f.finetune_instruct, splits, GPTModel(tiny_cfg()), get_tokenizer())
    assert len(task.sets["train"]) == 17
