"""Streaming tokenization equals the book's whole-text encoding, split for split."""

import pytest

from llm.corpus import _safe_cut, require_utf8, tokenize_corpus, utf8_error
from llm.data import read_tokens
from llm.errors import LLMError
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


# --- every run writes both splits, together --------------------------------------------------------
def test_every_run_writes_both_split_files_whatever_their_size(tmp_path):
    """A split that gets no text is an empty file, never the previous run's tokens (data.train_ratio 1e-9
    used to leave the last run's train.bin in place and pretraining trained on it)."""
    src = tmp_path / "c.txt"
    text = "one two three four five six seven eight nine ten " * 20
    src.write_text(text)
    out = tmp_path / "tok"
    first = tokenize_corpus([src], 0.5, out, progress=False)
    assert first["train_tokens"] > 0 and first["val_tokens"] > 0

    stats = tokenize_corpus([src], 1e-9, out, progress=False)
    assert stats == {"train_chars": 0, "val_chars": len(text), "train_tokens": 0, "val_tokens": len(encode(text))}
    assert read_tokens(out / "train.bin").tolist() == [] and read_tokens(out / "val.bin").tolist() == encode(text)

    src.write_text("")  # nothing at all: both files empty
    assert tokenize_corpus([src], 0.5, out, progress=False) == dict.fromkeys(stats, 0)
    assert (out / "train.bin").stat().st_size == 0 and (out / "val.bin").stat().st_size == 0
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]  # no temporary files left


def test_check_runs_per_split_and_a_refusal_keeps_the_previous_pair(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("alpha beta gamma delta " * 50)
    out = tmp_path / "tok"
    tokenize_corpus([src], 0.5, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def check(split, stats):
        calls.append((split, dict(stats)))
        if split == "train" and stats["train_tokens"] < 100:
            raise LLMError("too small")

    with pytest.raises(LLMError, match="too small"):
        tokenize_corpus([src], 0.05, out, progress=False, check=check)
    assert [c[0] for c in calls] == ["train"] and calls[0][1]["val_tokens"] == 0  # stopped before val was tokenized
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old pair, no temporary files

    calls.clear()
    stats = tokenize_corpus([src], 0.5, out, progress=False, check=check)
    assert [c[0] for c in calls] == ["train", "val"] and calls[-1][1] == stats


def test_check_sees_a_split_without_text(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("alpha beta")
    seen = []
    tokenize_corpus([src], 1e-9, tmp_path / "tok", progress=False, check=lambda split, s: seen.append((split, s)))
    assert [(split, s["train_tokens"]) for split, s in seen] == [("train", 0), ("val", 0)]
    assert seen[-1][1]["val_tokens"] == len(encode("alpha beta"))


# --- a corpus that is not UTF-8 ------------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 1 << 20])
def test_utf8_error_names_the_exact_byte_whatever_the_chunks(tmp_path, chunk_bytes):
    good = "naïve café\nline two ✓\n".encode()
    cases = [
        (good + b"bad \xe9 here", len(good) + 4, 3, b"\xe9"),
        (good[:7] + b"\xff" + good[7:], 7, 1, b"\xff"),
        (good + "✓".encode()[:2], len(good), 3, b"\xe2"),  # cut inside a character at the end
        (b"\x80", 0, 1, b"\x80"),
    ]
    for i, (data, offset, line, byte) in enumerate(cases):
        path = tmp_path / f"{i}.txt"
        path.write_bytes(data)
        assert utf8_error(path, chunk_bytes) == f"byte {byte!r} at offset {offset} (line {line})", i
    (tmp_path / "ok.txt").write_bytes(good)
    assert utf8_error(tmp_path / "ok.txt", chunk_bytes) is None
    (tmp_path / "empty.txt").write_bytes(b"")
    assert utf8_error(tmp_path / "empty.txt", chunk_bytes) is None


def test_a_corpus_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    (tmp_path / "a.txt").write_text("fine text " * 10)
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait\n" * 3)
    out = tmp_path / "tok"
    with pytest.raises(LLMError) as err:
        tokenize_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], 0.5, out, progress=False, names=["A", "B"])
    assert (
        str(err.value)
        == f"B ({tmp_path / 'b.txt'}) is not UTF-8 text: byte b'\\xe9' at offset 3 (line 1); save it as UTF-8"
    )
    with pytest.raises(LLMError, match=r"^the corpus file \(.*b.txt\) is not UTF-8 text"):
        tokenize_corpus([tmp_path / "b.txt"], 0.5, out, progress=False)
    assert not out.exists()
    with pytest.raises(LLMError, match=r"^cannot read X \(.*nope.txt\): No such file"):
        require_utf8(tmp_path / "nope.txt", "X")
