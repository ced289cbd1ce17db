"""Streaming tokenization equals the book's whole-text encoding, split for split."""

import pytest

from llm.corpus import _safe_cut, tokenize_corpus
from llm.data import read_tokens
from llm.tokenizer import encode


def book_split(text, ratio):
    split = int(ratio * len(text))
    return encode(text[:split]), encode(text[split:])


@pytest.mark.parametrize("chunk_chars", [64, 1000, 1 << 22])
def test_chunked_equals_whole_text(tmp_path, verdict_text, chunk_chars):
    src = tmp_path / "v.txt"
    src.write_text(verdict_text, encoding="utf-8")
    stats = tokenize_corpus([src], 0.9, tmp_path / "tok", chunk_chars=chunk_chars, progress=False)
    train, val = book_split(verdict_text, 0.9)
    assert read_tokens(tmp_path / "tok" / "train.bin").tolist() == train
    assert read_tokens(tmp_path / "tok" / "val.bin").tolist() == val
    assert stats == {"train_chars": 18431, "val_chars": 2048, "train_tokens": len(train), "val_tokens": len(val)}


def test_tricky_whitespace_and_several_files(tmp_path):
    a = "Hello  \n\nworld \n x\n" * 50 + "end"
    b = "second\r\nfile  with   spaces\n\n\n" * 30
    (tmp_path / "a.txt").write_text(a)
    (tmp_path / "b.txt").write_bytes(b.encode())
    tokenize_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], 0.7, tmp_path / "t", chunk_chars=37, progress=False)
    whole = a + "<|endoftext|>" + b.replace("\r\n", "\n")  # universal newlines, as the book's open()
    train, val = book_split(whole, 0.7)
    assert read_tokens(tmp_path / "t" / "train.bin").tolist() == train
    assert read_tokens(tmp_path / "t" / "val.bin").tolist() == val


def test_safe_cut_only_between_non_space_characters():
    assert _safe_cut("ab\ncd") == 3 and _safe_cut("ab cd") == 2 and _safe_cut("a b\nc") == 1
    assert _safe_cut("ab \ncd") == 0 and _safe_cut("ab\n cd") == 0 and _safe_cut("ab\n\ncd") == 0
    assert _safe_cut("ab  cd") == 0 and _safe_cut("ab\t cd") == 0


def test_random_texts_at_small_chunks(tmp_path):
    import random

    rng = random.Random(0)
    atoms = [
        "word",
        "Ünïcode",
        "42",
        "3.14",
        "'s",
        "'ll",
        "!!",
        "--",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "é",
        "<|endoftext|>",
    ]
    for trial in range(20):
        text = "".join(rng.choice(atoms) for _ in range(400))
        src = tmp_path / f"r{trial}.txt"
        src.write_text(text, encoding="utf-8")
        out = tmp_path / f"t{trial}"
        tokenize_corpus([src], 0.6, out, chunk_chars=rng.choice([5, 17, 64]), progress=False)
        train, val = book_split(text, 0.6)
        assert read_tokens(out / "train.bin").tolist() == train, trial
        assert read_tokens(out / "val.bin").tolist() == val, trial
